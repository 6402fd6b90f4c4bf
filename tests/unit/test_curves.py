"""Token efficiency from two loss curves: the tokens a baseline needs for its own final loss over the tokens another
run needs for it."""

import math

from rho1.eval.curves import format_efficiency, token_efficiency


def test_efficiency_is_the_ratio_of_tokens_to_the_baselines_final_loss():
    clm = [(0, 3.0), (100, 2.0), (200, 1.0)]
    slm = [(0, 3.0), (100, 1.0), (200, 0.5)]
    assert token_efficiency(clm, slm) == (2.0, True)
    assert format_efficiency(*token_efficiency(clm, slm)) == "2.00x"
    worse = [(0, 3.0), (100, 2.5), (200, 2.0)]  # never gets to 1.0: an upper bound over its whole budget
    assert token_efficiency(clm, worse) == (1.0, False)
    assert format_efficiency(*token_efficiency(clm, worse)) == "< 1.00x (never reached)"


def test_a_baseline_whose_loss_never_fell_has_nothing_to_compare():
    """Found by a new user on a 150-token corpus: CLM ended above its start, "needed" 0 tokens, and SLM showed 0.00x."""
    clm = [(0, 5.5583), (100, 5.5590), (200, 5.5594)]
    slm = [(0, 5.5583), (100, 5.5585), (200, 5.5587)]
    value, reached = token_efficiency(clm, slm)
    assert math.isnan(value) and not reached
    assert format_efficiency(value, reached) == "n/a"
