"""Held-out losses: on all tokens, on target tokens, and on the tokens selection keeps or drops."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from rho1.config import EvalConfig
from rho1.data.loader import make_batch
from rho1.data.store import TokenStore
from rho1.model import head_is_linear, without_head
from rho1.progress import progress_bar
from rho1.selection import chunked_cross_entropy, num_selected, select_top, token_cross_entropy


def linear_head_of(model, store: TokenStore, seq_len: int):
    """``model`` when its logits are a plain linear head (checked on the store's first tokens), else None:
    what ``head_of`` takes below."""
    device = next(model.parameters()).device
    sample = make_batch(store, np.arange(1), seq_len).input_ids[:, :32].to(device)
    return model if head_is_linear(model, sample) else None


def batch_token_losses(model, input_ids, labels, autocast=contextlib.nullcontext, head_of=None, dtype=None):
    """Per-token losses of one batch (float32, shaped like ``labels``), no gradient.

    ``head_of``: the (unwrapped) model, when its logits are a plain linear head (``rho1.model.head_is_linear``):
    the losses are then computed from the head's input in chunks, without the ``[tokens x vocab]`` logits
    (faster and smaller). ``dtype``: the head's compute dtype in that case (bf16/fp16 under mixed precision).
    """
    with torch.no_grad():
        if head_of is None:
            with autocast():
                logits = model(input_ids=input_ids, use_cache=False).logits
            return token_cross_entropy(logits, labels)
        with without_head(head_of) as weight, autocast():
            hidden = model(input_ids=input_ids, use_cache=False).logits
        hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype or weight.dtype)
        return chunked_cross_entropy(hidden, weight.to(hidden.dtype), labels.reshape(-1))[0].view_as(labels)


@torch.inference_mode()
def token_losses(model, store: TokenStore, seq_len: int, batch_size: int = 16, windows=None,
                 autocast=contextlib.nullcontext, progress: bool = False, desc: str = "loss", head_of=None,
                 dtype=None) -> np.ndarray:
    """Per-token loss of ``model`` over the store's windows: ``out[i]`` = loss of token i given its window.

    NaN where a token has no prediction (the first token of each window) or its window was not evaluated.
    ``head_of`` and ``dtype`` as in ``batch_token_losses``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = np.arange(store.num_windows(seq_len)) if windows is None else np.asarray(windows)
    out = np.full(store.n_tokens, np.nan, dtype=np.float32)
    bar = progress_bar(total=len(windows) * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    for i in range(0, len(windows), batch_size):
        batch = make_batch(store, windows[i : i + batch_size], seq_len).to(device)
        losses = batch_token_losses(model, batch.input_ids, batch.labels, autocast, head_of, dtype)
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
        if selected is not None:
            metrics["selected_loss"] = _mean(losses, evaluated & selected)
            metrics["unselected_loss"] = _mean(losses, evaluated & ~selected & np.isfinite(ref))
    return metrics


def evaluate_model(cfg: EvalConfig, progress: bool = True) -> dict:
    """`rho1 eval`: held-out losses of one model on each store (all / target / selected / unselected tokens,
    the split being the top ``ratio`` by excess loss of this model), and few-shot answer accuracy."""
    from pathlib import Path

    from rho1.data.store import ScoreStore, check_writable
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import check_model_fits, load_model

    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stores = [TokenStore.open(p).verify() for p in cfg.data]
    scores = [ScoreStore.open(s, st).verify() if s else None for s, st in zip(cfg.scores or [""] * len(stores), stores)]
    seq_len = cfg.seq_len or next((s.seq_len for s in scores if s is not None), 256)
    for s in scores:
        if s is not None and s.seq_len != seq_len:
            raise ValueError(f"scores {s.path} use windows of {s.seq_len} tokens but --seq-len is {seq_len}; "
                             f"pass --seq-len {s.seq_len}" + ("" if cfg.seq_len else " and evaluate each store alone"))
    if cfg.generations:
        check_writable(cfg.generations, "--generations", folder=False)
    model = load_model(cfg.model, cfg.trust_remote_code)
    results = {}
    if cfg.answers:
        from rho1.accuracy import answer_accuracy
        from rho1.config import AnswerConfig

        answers = AnswerConfig(cfg.answers, cfg.shots, cfg.exemplars, cfg.limit, cfg.max_new_tokens, cfg.batch_size,
                               cfg.generations)
        results["answers"] = answer_accuracy(model, load_tokenizer(cfg.model, cfg.trust_remote_code), answers)
    for store, score_store in zip(stores, scores):
        check_model_fits(model, store, cfg.model)
        losses = token_losses(model, store, seq_len, cfg.batch_size, progress=progress, desc=store.path.name,
                              head_of=linear_head_of(model, store, seq_len))
        ref = None if score_store is None else np.asarray(score_store.scores, np.float32)
        selected = None if ref is None else fixed_selection(losses, ref, cfg.ratio)
        results[Path(store.path).name] = summarize(losses, store, ref, selected)
    return results


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
