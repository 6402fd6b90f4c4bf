"""The paper's four classes of token dynamics, on hand-made trajectories."""



import numpy as np
import pytest

from rho1.analysis.dynamics import CLASSES, classify


def _class(trajectory, tokens=None, threshold=0.2, others=()):
    """The class of the first token when classified beside ``others`` (they set the last-checkpoint mean)."""
    losses = np.array([trajectory, *others], dtype=np.float64).T
    classes, _ = classify(losses, tokens, threshold)
    return CLASSES[classes[0]]


def test_classifier_hand_made_trajectories():
    flat_high, flat_low = [3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]
    assert _class([4.0, 3.0, 2.0, 1.0], others=[flat_low]) == "H->L"
    assert _class([1.0, 2.0, 3.0, 4.0], others=[flat_low]) == "L->H"
    assert _class([1.0, 1.1, 0.9, 1.0], others=[flat_high]) == "L->L"
    assert _class([3.0, 2.9, 3.1, 3.0], others=[flat_low]) == "H->H"
    # fluctuating strongly but with no trend: still L->L / H->H (Fig. 3b, 3c)
    assert _class([1.0, 2.5, 2.5, 1.0], others=[flat_high]) == "L->L"
    assert _class([3.0, 0.5, 0.5, 3.0], others=[flat_low]) == "H->H"
    # the fit uses tokens trained: uneven checkpoint spacing changes the slope
    assert _class([1.0, 1.3, 1.3], tokens=[0, 1, 2], others=[flat_low[:3]]) == "L->H"
    assert _class([1.0, 1.3, 1.3], tokens=[0, 1, 100], others=[flat_low[:3]]) == "H->H"  # dL 0.15


def test_classifier_boundaries():
    # dL exactly at the threshold is not a change (the paper's inequalities are strict)
    assert _class([1.0, 1.125, 1.25], threshold=0.25, others=[[0.0, 0.0, 0.0]]) == "H->H"
    assert _class([1.25, 1.125, 1.0], threshold=0.25, others=[[5.0, 5.0, 5.0]]) == "L->L"
    assert _class([1.0, 1.125, 1.5], threshold=0.25, others=[[0.0, 0.0, 0.0]]) == "L->H"
    # a last loss equal to the mean of all last losses is L->L
    assert _class([2.0, 2.0], others=[[2.0, 2.0]]) == "L->L"
    with pytest.raises(ValueError, match="2 or more checkpoints"):
        classify(np.ones((1, 3)))
