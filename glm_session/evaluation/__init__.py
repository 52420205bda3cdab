"""Evaluation: generation turn by turn from the gold history, Chinese ROUGE per turn, teacher-forced loss."""
