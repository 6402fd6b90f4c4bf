"""Measures the stages share: held-out losses and the selected/unselected split (heldout.py), answer accuracy
(accuracy.py), token efficiency over training (curves.py). The `rho1 eval` stage itself is rho1.evaluate."""
