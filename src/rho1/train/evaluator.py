"""Held-out metrics during training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rho1.accel import compute_dtype
from rho1.config import TrainConfig
from rho1.data.store import ScoreStore, TokenStore
from rho1.eval.heldout import fixed_selection, summarize
from rho1.head import token_losses


class Evaluator:
    """Held-out metrics at a checkpoint. The selected/unselected split of each held-out store is fixed
    at the first evaluation (top ``ratio`` by excess loss of the starting model), so the curves of
    different runs (CLM, SLM, ablations) from the same starting model compare the same tokens.

    ``head_of``: the unwrapped model when its head is plain linear (chunked losses); ``reference``:
    ``(model, head_of)`` of a reference model run here when the held-out stores have no ScoreStore;
    ``resuming``: reuse the split a resumed run saved (a run started over recomputes it)."""

    def __init__(self, cfg: TrainConfig, accelerator, head_of=None, reference=None, resuming: bool = False):
        self.cfg, self.accelerator, self.head_of, self.reference = cfg, accelerator, head_of, reference
        self.stores = [TokenStore.open(p).check() for p in cfg.eval_data]
        scores = cfg.eval_scores or [""] * len(self.stores)
        score_stores = [ScoreStore.open(s, st).check() if s else None for s, st in zip(scores, self.stores)]
        for s in score_stores:
            if s is not None and s.seq_len != cfg.seq_len:
                raise ValueError(f"eval scores {s.path} use windows of {s.seq_len} tokens but --seq-len is "
                                 f"{cfg.seq_len}; rescore with --seq-len {cfg.seq_len}")
        # per-token reference losses of each held-out store; with an online reference model, computed once
        self.refs = [None if s is None else np.asarray(s.scores, np.float32) for s in score_stores]
        self.names = [Path(p).name for p in cfg.eval_data]
        # kept in the run directory so a resumed run compares the same tokens
        self.selected_paths = [Path(cfg.out) / f"eval_selection_{i}.npy" for i in range(len(self.stores))]
        self.selected = [np.load(p, allow_pickle=False) if resuming and p.is_file() else None
                         for p in self.selected_paths]

    def __call__(self, model) -> dict:
        """Metrics ``eval/<store>/<metric>``; ``model`` is the wrapped model (under FSDP every process
        takes part in each forward)."""
        metrics = {}
        for i, (name, store) in enumerate(zip(self.names, self.stores)):
            losses = self._losses(model, self.head_of, store)
            if self.refs[i] is None and self.reference is not None:
                self.refs[i] = self._losses(*self.reference, store)
            if self.refs[i] is not None and self.selected[i] is None:
                self.selected[i] = fixed_selection(losses, self.refs[i], self.cfg.ratio)
                if self.accelerator.is_main_process:
                    self.selected_paths[i].parent.mkdir(parents=True, exist_ok=True)
                    np.save(self.selected_paths[i], self.selected[i], allow_pickle=False)
            for key, value in summarize(losses, store, self.refs[i], self.selected[i]).items():
                metrics[f"eval/{name}/{key}"] = value
        return metrics

    def _losses(self, model, head_of, store: TokenStore) -> np.ndarray:
        n = store.num_windows(self.cfg.seq_len)
        windows = np.arange(min(n, self.cfg.eval_max_windows) if self.cfg.eval_max_windows else n)
        return token_losses(model, store, self.cfg.seq_len, self.cfg.batch_size, windows,
                            autocast=self.accelerator.autocast, head_of=head_of,
                            dtype=compute_dtype(self.cfg.precision))
