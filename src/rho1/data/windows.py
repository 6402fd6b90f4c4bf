"""Examples for ``transformers.Trainer`` from rho1's stores: a TokenStore's windows (the windows `rho1 train` and
`rho1 score` use, so a ScoreStore's losses line up with them) and the collator that pads them and looks their
reference losses up. The trainer side is rho1.hf."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rho1.data.loader import trainable_mask
from rho1.data.store import IGNORE_INDEX, ScoreStore, TokenStore


class WindowsDataset(torch.utils.data.Dataset):
    """The store's windows of ``seq_len`` tokens as examples ``{"input_ids", "offset"}``, read from the
    memory-mapped store when asked for (a store of any size, in constant memory). Picklable for DataLoader
    workers: a worker reopens the store by its path instead of copying the tokens."""

    def __init__(self, store: TokenStore, seq_len: int, train_on: str = "all"):
        self.path, self.seq_len, self._store, self.train_on = Path(store.path), seq_len, store, train_on
        self._len = store.num_windows(seq_len)
        if train_on == "target":
            trainable_mask(store, "target")  # one sentence when the store has no target tokens

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} of {self._len}")
        start = index * self.seq_len
        tokens = self.store.tokens[start : start + self.seq_len].astype(np.int64)
        example = {"input_ids": tokens.tolist(), "offset": start}
        if self.train_on == "target":  # labels as Trainer takes them (unshifted): -100 on every prompt token
            target = np.asarray(self.store.target_mask[start : start + len(tokens)]) > 0
            example["labels"] = np.where(target, tokens, IGNORE_INDEX).tolist()
        return example

    @property
    def store(self) -> TokenStore:
        if self._store is None:
            self._store = TokenStore.open(self.path)
        return self._store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}


def windows_dataset(store: TokenStore, seq_len: int, train_on: str = "all") -> WindowsDataset:
    """The store's windows of ``seq_len`` tokens as examples ``{"input_ids", "offset"}``, the windows
    `rho1 train` and `rho1 score` use, so a ScoreStore's losses line up with them (a lazy Dataset).
    ``train_on="target"``: with ``labels``, -100 on every token outside the store's target (the prompts)."""
    return WindowsDataset(store, seq_len, train_on)


class SelectiveCollator:
    """Right-pads ``input_ids`` (and ``labels`` when given, else labels = input_ids) into a batch, with
    ``labels`` of -100 at padding and ``ref_loss`` per token (the reference loss of predicting that token;
    NaN where unknown) looked up in ``scores`` for examples with an ``offset``."""

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, scores: ScoreStore | None = None,
                 store: TokenStore | None = None):
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id, self.scores, self.tokenizer = pad_token_id, scores, tokenizer
        # the scored corpus, to check each example's tokens against it
        self.store = store or (TokenStore.open(scores.manifest["token_store"]) if scores is not None else None)

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        ref = torch.full((n, width), float("nan")) if self.scores is not None else None
        for i, e in enumerate(examples):
            ids = torch.as_tensor(e["input_ids"], dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            labels[i, : len(ids)] = torch.as_tensor(e["labels"], dtype=torch.long) if "labels" in e else ids
            attention[i, : len(ids)] = 1
            if ref is not None:
                ref[i, : len(ids)] = self._lookup(e, ids)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if ref is not None:
            batch["ref_loss"] = ref
        return batch

    def _lookup(self, example: dict, ids: torch.Tensor) -> torch.Tensor:
        if "offset" not in example:
            raise ValueError("SelectiveCollator(scores=...) needs an 'offset' per example (the position of its first "
                             "token in the scored TokenStore); make the dataset with rho1.hf.windows_dataset")
        start = int(example["offset"])
        stored = self.store.tokens[start : start + len(ids)]
        if len(stored) != len(ids) or not np.array_equal(stored, ids.numpy()):
            raise ValueError(f"example at offset {start} does not match the tokens the scores were computed on; "
                             "the dataset and the ScoreStore come from different corpora or tokenizers")
        return torch.from_numpy(np.asarray(self.scores.scores[start : start + len(ids)], dtype=np.float32))
