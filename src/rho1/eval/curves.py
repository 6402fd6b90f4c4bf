"""Curves from a run's metrics.jsonl: an eval metric against tokens, tokens to reach a loss, token efficiency."""

from __future__ import annotations


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First point (linearly interpolated between evaluations) where a loss curve gets to ``target``."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            if l0 <= target:
                return float(t0)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    if curve and curve[0][1] <= target:
        return float(curve[0][0])
    return None


def token_efficiency(baseline: list[tuple[int, float]], other: list[tuple[int, float]]) -> tuple[float, bool]:
    """Tokens the baseline needs to reach its own final loss / tokens ``other`` needs to reach it.

    Returns (ratio, reached). When ``other`` never reaches it, the ratio is an upper bound computed with
    its whole budget, and ``reached`` is False. NaN (printed n/a) when there is nothing to compare: a NaN final
    loss, or a baseline whose loss never fell below where it started (it "needs" 0 tokens).
    """
    target = baseline[-1][1]
    needed = tokens_to_reach(baseline, target)
    if not needed:  # None: a NaN final loss (no target tokens evaluated); 0: training did not lower the loss
        return float("nan"), False
    got = tokens_to_reach(other, target)
    if got is None:
        return needed / other[-1][0], False
    return needed / max(got, 1e-9), True


def read_curve(metrics_path, key: str, x: str = "tokens") -> list[tuple[float, float]]:
    """(tokens, value) of one eval metric from a run's metrics.jsonl; ``x="flops"``: (training FLOPs so far, value),
    empty for a run logged before FLOPs were counted."""
    from rho1.data.store import read_jsonl

    return [(r[x], r[key]) for r in read_jsonl(metrics_path) if r.get("kind") == "eval" and key in r and x in r]


def format_efficiency(value: float, reached: bool) -> str:
    """``1.52x``, or ``< 0.93x (never reached)`` when the run never got to the baseline's loss."""
    if value != value:
        return "n/a"
    return f"{value:.2f}x" if reached else f"< {value:.2f}x (never reached)"


def target_key(keys) -> str | None:
    """The eval metric runs are compared on: the first held-out store's target loss, else its loss."""
    keys = [k for k in keys if k.startswith("eval/")]
    return next((k for suffix in ("/target_loss", "/loss") for k in keys if k.endswith(suffix)), None)
