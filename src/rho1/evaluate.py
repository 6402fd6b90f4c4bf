"""Held-out losses: on all tokens, on target tokens, and on the tokens selection keeps or drops."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from rho1.data.loader import make_batch
from rho1.data.store import ScoreStore, TokenStore
from rho1.selection import num_selected, select_top, token_cross_entropy


@torch.no_grad()
def token_losses(model, store: TokenStore, seq_len: int, batch_size: int = 16, windows=None,
                 autocast=contextlib.nullcontext, progress: bool = False, desc: str = "loss") -> np.ndarray:
    """Per-token loss of ``model`` over the store's windows: ``out[i]`` = loss of token i given its window.

    NaN where a token has no prediction (the first token of each window) or its window was not evaluated.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = np.arange(store.num_windows(seq_len)) if windows is None else np.asarray(windows)
    out = np.full(store.n_tokens, np.nan, dtype=np.float32)
    bar = tqdm(total=len(windows) * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    for i in range(0, len(windows), batch_size):
        batch = make_batch(store, windows[i : i + batch_size], seq_len).to(device)
        with autocast():
            logits = model(input_ids=batch.input_ids).logits
        losses = token_cross_entropy(logits, batch.labels)
        keep = batch.positions >= 0
        out[batch.positions[keep].cpu().numpy()] = losses[keep].float().cpu().numpy()
        bar.update(int(batch.input_ids.numel()))
    bar.close()
    model.train(was_training)
    return out


def fixed_selection(losses: np.ndarray, ref: np.ndarray, ratio: float) -> np.ndarray:
    """The held-out tokens with the top ``ratio`` excess loss, ranked over the whole held-out set at once."""
    valid = np.isfinite(losses) & np.isfinite(ref)
    scores = torch.from_numpy(np.nan_to_num(losses) - np.nan_to_num(ref))
    k = num_selected(int(valid.sum()), ratio)
    return select_top(scores, torch.from_numpy(valid), k).numpy()


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    where = where & np.isfinite(values)
    return float(values[where].mean()) if where.any() else math.nan


def summarize(losses: np.ndarray, store: TokenStore, scores: ScoreStore | None = None,
              selected: np.ndarray | None = None) -> dict:
    """Mean loss on all evaluated tokens, on target tokens, and on selected / unselected tokens."""
    evaluated = np.isfinite(losses)
    metrics = {"loss": _mean(losses, evaluated), "tokens": int(evaluated.sum())}
    if store.target_mask is not None:
        metrics["target_loss"] = _mean(losses, evaluated & (np.asarray(store.target_mask) > 0))
    if scores is not None:
        ref = np.asarray(scores.scores, dtype=np.float32)
        metrics["ref_loss"] = _mean(ref, evaluated)
        if selected is not None:
            metrics["selected_loss"] = _mean(losses, evaluated & selected)
            metrics["unselected_loss"] = _mean(losses, evaluated & ~selected & np.isfinite(ref))
    return metrics


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
    its whole budget, and ``reached`` is False.
    """
    target = baseline[-1][1]
    needed = tokens_to_reach(baseline, target)
    got = tokens_to_reach(other, target)
    if got is None:
        return needed / other[-1][0], False
    return needed / max(got, 1e-9), True


def read_curve(metrics_path, key: str) -> list[tuple[int, float]]:
    """(tokens, value) of one eval metric from a run's metrics.jsonl."""
    import json

    curve = []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "eval" and key in record:
                curve.append((record["tokens"], record[key]))
    return curve
