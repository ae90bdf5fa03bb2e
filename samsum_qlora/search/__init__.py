"""Hyperparameter search: Optuna chooses, Dask runs, DVC records (stages/search.py is the command)."""
