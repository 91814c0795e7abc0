"""Evaluation entry points run from the repository root (`python -m eval.knn ...`); their code: sslfg/commands."""
