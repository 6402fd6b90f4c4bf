"""Selection rules: how the scores of a step's tokens become per-token weights. A registry like the score
functions, so a new rule is one ``register_rule`` call and ``rho1 train --rule``, ``SelectiveTrainer(rule=)``,
``rho1 sweep --rules`` and ``rho1 export --rule`` know it.

A rule is ``fn(scores, valid, ratio, **options) -> weights``: ``scores`` are float32 per token (higher = kept
first), ``valid`` is False for ignored labels and NaN references (their weight must be 0), ``ratio`` is in
(0, 1], and ``options`` holds ``temperature`` and ``threshold`` (``--temperature``, ``--threshold``; take
``**options`` to ignore them). Weights are in [0, 1], shaped like ``scores``. The loss is the weighted sum of
token losses divided by the sum of weights over the whole optimizer step and every process. ``hard`` rules
give only 0 and 1, so only their kept tokens need a backward. Imports no torch, so the CLI lists the names at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rho1.checks import check_choice


@dataclass(frozen=True)
class SelectionRule:
    name: str
    fn: Callable
    help: str = ""
    hard: bool = True


RULES: dict[str, SelectionRule] = {}


def register_rule(name: str, fn: Callable, help: str = "", hard: bool = True) -> SelectionRule:
    """Make ``name`` a selection rule everywhere (``--rule NAME``, ``rule="NAME"``). Registering a name again
    replaces it."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a selection rule's name must be letters, digits, - or _, got {name!r}")
    if name in BUILT_IN and (fn is not BUILT_IN[name] or name in RULES and RULES[name].hard != hard):
        raise ValueError(f"{name!r} is a built-in selection rule; register yours under another name")
    RULES[name] = SelectionRule(name, fn, help, hard)
    return RULES[name]


def get_rule(name: str) -> SelectionRule:
    if name not in RULES:
        raise ValueError(f"unknown selection rule {name!r}; choose one of {', '.join(RULES)} "
                         "(or register your own with rho1.register_rule)")
    return RULES[name]


def check_rule(name: str) -> str:
    get_rule(name)
    return name


def check_rule_options(rule: str, temperature: float, threshold: float) -> None:
    check_choice("rule", rule, tuple(RULES))
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be a positive number, got {temperature}; e.g. 0.25 (towards 0 the soft "
                         "rule becomes topk)")
    if not math.isfinite(threshold):
        raise ValueError(f"--threshold must be a finite number of nats, got {threshold}")


def topk(scores, valid, ratio, **options):
    """Exactly round(ratio * valid tokens) of the highest scores (the paper's rule); ties keep earlier tokens."""
    from rho1.selection.ranking import num_selected, select_top

    return select_top(scores, valid, num_selected(int(valid.sum()), ratio)).float()


def soft(scores, valid, ratio, temperature: float = 0.25, **options):
    """sigmoid((score - c) / temperature), c halfway between the k-th and (k+1)-th highest scores, so the
    weights tend to top-k as the temperature goes to 0 and no gradient is cut by a hair's difference in score."""
    import torch

    from rho1.selection.ranking import num_selected

    n_valid = int(valid.sum())
    k = num_selected(n_valid, ratio)
    if k >= n_valid:
        return valid.float()
    top = torch.topk(scores[valid].float(), k + 1).values
    centre = (top[k - 1] + top[k]) / 2
    weights = torch.sigmoid((scores.float() - centre) / temperature)
    return torch.where(valid, weights, torch.zeros_like(weights))


def threshold(scores, valid, ratio, threshold: float = 0.0, **options):
    """The tokens scoring above ``threshold`` (nats of excess loss), at most the top ``ratio`` of them."""
    from rho1.selection.ranking import num_selected, select_top

    above = valid & (scores > threshold)
    k = num_selected(int(valid.sum()), ratio)
    if int(above.sum()) > k:
        above = select_top(scores, above, k)
    return above.float()


BUILT_IN = {"topk": topk, "soft": soft, "threshold": threshold}
register_rule("topk", topk, "the top --ratio of tokens by score (the paper's rule)")
register_rule("soft", soft, "a weight per token, sigmoid((score - top-k threshold) / --temperature)", hard=False)
register_rule("threshold", threshold, "the tokens scoring above --threshold, at most the top --ratio of them")
