"""Search: Optuna studies over merge recipes."""
