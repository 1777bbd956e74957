"""Evaluation: eval loss, greedy generations and task accuracy, lm-eval tasks."""
