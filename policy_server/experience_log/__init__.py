"""The experience log: every served decision, and the rewards sent later, in rotating files.

``writer.ExperienceLog`` writes it off the request path; ``files.read_log`` reads it back;
``join.episodes`` pairs outcomes with decisions into episodes; ``minari_export`` writes a Minari
dataset; ``transitions`` gives the trainers' ``ExperienceBatch`` (DQN's replay buffer).
"""
