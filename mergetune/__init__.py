"""mergetune: search merge recipes for open-weight LLMs, score them with lm-eval."""

__version__ = "0.1.0"
