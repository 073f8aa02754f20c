"""Evaluation: lm-eval tasks scored against one live model, again and again."""
