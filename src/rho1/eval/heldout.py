"""Held-out losses: on all tokens, on target tokens, and on the tokens selection keeps or drops."""

from __future__ import annotations

import math

import numpy as np
import torch

from rho1.data.store import TokenStore
from rho1.selection import num_selected, select_top


def fixed_selection(losses: np.ndarray, ref: np.ndarray, ratio: float) -> np.ndarray:
    """The held-out tokens with the top ``ratio`` excess loss, ranked over the whole held-out set at once."""
    valid = np.isfinite(losses) & np.isfinite(ref)
    scores = torch.from_numpy(np.nan_to_num(losses) - np.nan_to_num(ref))
    k = num_selected(int(valid.sum()), ratio)
    return select_top(scores, torch.from_numpy(valid), k).numpy()


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    where = where & np.isfinite(values)
    return float(values[where].mean()) if where.any() else math.nan


def summarize(losses: np.ndarray, store: TokenStore, ref: np.ndarray | None = None,
              selected: np.ndarray | None = None) -> dict:
    """Mean loss on all evaluated tokens, on target tokens, and on selected / unselected tokens.
    ``ref``: the reference model's per-token losses of the store (e.g. a ScoreStore's scores)."""
    evaluated = np.isfinite(losses)
    metrics = {"loss": _mean(losses, evaluated), "tokens": int(evaluated.sum())}
    if store.target_mask is not None:
        metrics["target_loss"] = _mean(losses, evaluated & (np.asarray(store.target_mask) > 0))
    if ref is not None:
        ref = np.asarray(ref, dtype=np.float32)
        metrics["ref_loss"] = _mean(ref, evaluated)
        if store.target_mask is not None:  # both on the target tokens the reference has a loss for
            both = evaluated & (np.asarray(store.target_mask) > 0) & np.isfinite(ref)
            metrics["ref_target_loss"] = _mean(ref, both)
            metrics["target_excess_loss"] = _mean(losses - np.nan_to_num(ref), both)
        if selected is not None:
            metrics["selected_loss"] = _mean(losses, evaluated & selected)
            metrics["unselected_loss"] = _mean(losses, evaluated & ~selected & np.isfinite(ref))
    return metrics
