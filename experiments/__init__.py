"""Code only the experiments of docs/experiments/ (scripts/experiment_*.py) and their tests use: the arithmetic
sub-task family and the per-task experts trained on it. Not part of the installed package."""
