"""Evaluation of an experiment: models on the test sets, ranking, test sets, the report."""
