"""The designs the serving benchmark compares ours with: the floor and the Pathmind design."""
