"""Evaluation: metrics on predictions, and batched greedy inference with left padding."""
