"""Evaluation: held-out losses (`rho1 eval`), answer accuracy, and curves over training."""
