"""How many tokens a selection keeps and which: the counting and ranking every rule and loss shares (pure torch)."""

from __future__ import annotations

import torch

from rho1.checks import check_ratio


def num_selected(n_valid: int, ratio: float) -> int:
    """How many of ``n_valid`` tokens a selection keeps: round(ratio * n_valid), at least 1."""
    if n_valid <= 0:
        return 0
    return min(n_valid, max(1, round(check_ratio(ratio) * n_valid)))


def valid_mask(labels: torch.Tensor, ref_loss: torch.Tensor | None, ignore_index: int = -100) -> torch.Tensor:
    """Tokens that can be selected: a real label and, when references are given, a finite reference loss."""
    valid = labels != ignore_index
    if ref_loss is not None:
        valid = valid & torch.isfinite(ref_loss)
    return valid


def select_top(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest-scoring valid positions.

    Deterministic: ties keep the earlier position (in flattened order) first.
    """
    flat_scores = scores.detach().reshape(-1).float()
    flat_valid = valid.reshape(-1)
    mask = torch.zeros_like(flat_valid)
    if k <= 0:
        return mask.view_as(valid)
    candidates = flat_valid.nonzero(as_tuple=True)[0]
    order = torch.sort(flat_scores[candidates], descending=True, stable=True).indices
    mask[candidates[order[:k]]] = True
    return mask.view_as(valid)
