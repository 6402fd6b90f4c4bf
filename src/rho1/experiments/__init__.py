"""Experiments built from the stages: the demo (`rho1 demo`) and sweeps (`rho1 sweep`)."""
