"""Analyses of a run: token-loss dynamics over checkpoints, the token viewer, plots and the HTML report."""
