"""Batches of windows from a TokenStore, with shifted labels and aligned reference losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rho1.data.export_format import kept_positions
from rho1.data.store import IGNORE_INDEX, ScoreStore, TokenStore


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], labels[b, t] = input_ids[b, t + 1]; IGNORE_INDEX past the window
    ref_loss: torch.Tensor | None  # [B, T], reference loss of labels[b, t]; NaN where unknown
    positions: torch.Tensor  # [B, T] int64, stream position of labels[b, t] (-1 where ignored)
    label_ids: torch.Tensor | None = None  # [B, T] the source label id of labels[b, t] (-1 where ignored)

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def make_batch(store: TokenStore, windows, seq_len: int, scores: ScoreStore | None = None,
               keep: np.ndarray | None = None) -> Batch:
    """The windows (indices into the store's seq_len windows) as one batch, right-padded with EOS.
    ``keep``: 1 per stream position that may be trained on (``trainable_mask``); every other label is
    IGNORE_INDEX, as if past the window."""
    n = len(windows)
    input_ids = np.full((n, seq_len), store.manifest["eos_token_id"], dtype=np.int64)
    positions = np.full((n, seq_len), -1, dtype=np.int64)
    for row, w in enumerate(windows):
        start = int(w) * seq_len
        end = min(start + seq_len, store.n_tokens)
        input_ids[row, : end - start] = store.tokens[start:end]
        positions[row, : end - start - 1] = np.arange(start + 1, end)
    if keep is not None:
        positions = np.where((positions >= 0) & (keep[np.maximum(positions, 0)] > 0), positions, -1)
    has_label = positions >= 0
    labels = np.where(has_label, np.roll(input_ids, -1, axis=1), IGNORE_INDEX)
    ref = None
    if scores is not None:
        safe = np.where(has_label, positions, 0)
        ref = torch.from_numpy(np.where(has_label, scores.scores[safe].astype(np.float32), np.nan))
    label_ids = torch.from_numpy(store.token_labels(positions)) if store.label_names else None
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), ref, torch.from_numpy(positions), label_ids)


def trainable_mask(store: TokenStore, train_on: str = "all", selection: str | None = None,
                   seq_len: int | None = None) -> np.ndarray | None:
    """1 per stream position whose token may be trained on, or None for every token: ``train_on="target"``
    keeps the store's target tokens (the answer, the assistant turns), ``selection`` the tokens an export of
    `rho1 export` labelled; both given, the tokens both keep."""
    keep = None
    if train_on == "target":
        if store.target_mask is None:
            raise ValueError(f"--train-on target needs target tokens, and {store.path} has none; prepare it with "
                             "--template and --target-field (or --chat-field), or use --train-on all")
        keep = np.asarray(store.target_mask)
    if selection is not None:
        kept = kept_positions(selection, store, seq_len)
        keep = kept if keep is None else keep & kept
    return keep


class WindowOrder:
    """A deterministic, endless order of window indices: a fresh permutation per epoch, from the seed.

    ``take(start, count)`` returns positions ``start .. start+count`` of that endless order, so the data
    seen at any step is a pure function of (seed, step): resuming needs only the step.
    """

    def __init__(self, n_windows: int, seed: int):
        if n_windows <= 0:
            raise ValueError("the TokenStore has no full window of tokens; use a larger corpus or a smaller --seq-len")
        self.n_windows, self.seed = n_windows, seed
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:  # one epoch at a time is kept
            self._cache = {e: np.random.default_rng([self.seed, e]).permutation(self.n_windows)}
        return self._cache[e]

    def take(self, start: int, count: int) -> np.ndarray:
        out = []
        while count > 0:
            e, offset = divmod(start, self.n_windows)
            part = self.epoch(e)[offset : offset + count]
            out.append(part)
            start += len(part)
            count -= len(part)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
