"""Training the served policies (issue 3 builds the trainers on these pure functions)."""
