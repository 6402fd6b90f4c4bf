"""`rho1 eval`: a model's held-out losses on each store (all / target / selected / unselected tokens, the split
being the top --ratio by excess loss of this model), and its answer accuracy; printed, and written to --out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rho1.config import EvalConfig
from rho1.data.store import TokenStore
from rho1.eval.heldout import fixed_selection, summarize
from rho1.head import linear_head_of, token_losses
from rho1.threads import set_threads


def evaluate_model(cfg: EvalConfig, progress: bool = True) -> dict:
    """`rho1 eval`: held-out losses of one model on each store (all / target / selected / unselected tokens,
    the split being the top ``ratio`` by excess loss of this model), and few-shot answer accuracy; written to
    ``cfg.out`` too when it is set (one writer at a time, as every stage)."""
    import contextlib

    from rho1.data.loader import trainable_mask
    from rho1.data.store import ScoreStore, check_writable, write_json_atomic
    from rho1.lock import write_lock

    cfg.check()
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    stores = [TokenStore.open(p).check() for p in cfg.data]
    if cfg.train_on == "target":  # one sentence before any model is loaded
        for store in stores:
            trainable_mask(store, "target")
    scores = [ScoreStore.open(s, st).check() if s else None for s, st in zip(cfg.scores or [""] * len(stores), stores)]
    seq_len = cfg.seq_len or next((s.seq_len for s in scores if s is not None), 256)
    for s in scores:
        if s is not None and s.seq_len != seq_len:
            raise ValueError(f"scores {s.path} use windows of {s.seq_len} tokens but --seq-len is {seq_len}; "
                             f"pass --seq-len {s.seq_len}" + ("" if cfg.seq_len else " and evaluate each store alone"))
    written = [(flag, path) for flag, path in (("--out", cfg.out), ("--generations", cfg.generations)) if path]
    for flag, path in written:
        check_writable(path, flag, folder=False)
    with contextlib.ExitStack() as held:
        for _, path in written:
            held.enter_context(write_lock(path, "rho1 eval"))
        results = _evaluate(cfg, stores, scores, seq_len, progress)
        if cfg.out:
            write_json_atomic(Path(cfg.out), results)
    return results


def _evaluate(cfg: EvalConfig, stores: list, scores: list, seq_len: int, progress: bool) -> dict:
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import check_model_fits, check_positions, load_model

    model = load_model(cfg.model, cfg.trust_remote_code)
    results = {}
    if cfg.answers:
        from rho1.config import AnswerConfig
        from rho1.eval.accuracy import answer_accuracy

        answers = AnswerConfig(cfg.answers, cfg.shots, cfg.exemplars, cfg.limit, cfg.max_new_tokens, cfg.batch_size,
                               cfg.generations, cfg.chat)
        results["answers"] = answer_accuracy(model, load_tokenizer(cfg.model, cfg.trust_remote_code), answers)
    for store, score_store in zip(stores, scores):
        check_model_fits(model, store, cfg.model)
        check_positions(model, seq_len, cfg.model, "--seq-len" if cfg.seq_len else "the window length")
        losses = token_losses(model, store, seq_len, cfg.batch_size, progress=progress, desc=store.path.name,
                              head_of=linear_head_of(model, store, seq_len))
        if cfg.train_on == "target":  # only the target tokens count, for the loss and the selected split
            losses = np.where(np.asarray(store.target_mask) > 0, losses, np.nan)
        ref = None if score_store is None else np.asarray(score_store.scores, np.float32)
        selected = None if ref is None else fixed_selection(losses, ref, cfg.ratio)
        results[Path(store.path).name] = summarize(losses, store, ref, selected)
    return results
