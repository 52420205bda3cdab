"""Pieces of the training loop that Lightning leaves to the project: the LR schedule, atomic checkpoints,
the run's metrics file."""
