"""Hyperparameter search (``reslab tune``): Optuna studies over ``train`` runs, tracked in MLflow."""
