"""Token selection and the selective language modeling (SLM) loss. Pure torch, no I/O.

    scores.py     registry of score functions (register_score); imports no torch
    rules.py      registry of selection rules (register_rule): topk, soft, threshold; imports no torch
    ranking.py    how many tokens a ratio keeps, and the top k of a score (what rules and losses share)
    loss.py       Selection, selective_loss, select_from_token_loss: weights by rule and score, the weighted loss
    linear_ce.py  the same from the LM head's input, in chunks, without the [tokens x vocab] logits

Everything is importable from here. The names from loss.py and linear_ce.py load torch on first use, so
``rho1.selection.scores`` (and the CLI that lists its names) stays light.
"""

from rho1.selection.rules import RULES, SelectionRule, check_rule, check_rule_options, get_rule, register_rule
from rho1.selection.scores import SCORES, ScoreFunction, check_score, get_score, register_score

_HEAVY = {
    "ranking": ("num_selected", "select_top", "valid_mask"),
    "loss": ("Selection", "check_inputs", "select_from_token_loss", "selection_stats", "selective_loss",
             "token_cross_entropy"),
    "linear_ce": ("chunked_cross_entropy", "default_chunk_size", "grad_chunk_size", "selective_linear_cross_entropy"),
}
__all__ = ["SCORES", "ScoreFunction", "check_score", "get_score", "register_score", "check_ratio",
           "RULES", "SelectionRule", "check_rule", "check_rule_options", "get_rule", "register_rule",
           *(name for names in _HEAVY.values() for name in names)]


def __getattr__(name: str):
    import importlib

    if name == "check_ratio":
        from rho1.checks import check_ratio

        return check_ratio
    for module, names in _HEAVY.items():
        if name in names:
            return getattr(importlib.import_module(f"rho1.selection.{module}"), name)
    raise AttributeError(f"module 'rho1.selection' has no attribute {name!r}")
