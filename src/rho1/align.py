"""A reference model with another tokenizer: its per-token losses projected onto the learner's tokens.

For each window of learner tokens, the reference reads exactly the text those tokens decode to (documents
inside the window separated by the reference's own EOS token, so it conditions on what the learner
conditions on), and its per-token losses are projected back through byte offsets:

* reference token k covers the bytes from the end of token k-1 to the end of its own last character
  (so the spans tile the text, whitespace merged into a token included), and its loss is spread evenly
  over those bytes (a token with no byte of its own, e.g. the second half of a character split by a
  byte-level tokenizer, puts its loss on the last byte of the previous span);
* a learner token's reference loss is the sum over its bytes. The sum over a window, hence over a
  document, is preserved: every reference loss lands on exactly one set of learner tokens;
* a learner token is NaN (never selected) when any of its bytes has no reference loss: the window's first
  token (as in the direct path), a reference token with no prediction (the first one of the window when the
  reference has no BOS), or an incomplete UTF-8 character cut by the window's edge. A learner EOS takes
  the loss of the reference's EOS at that place.

With the same tokenizer on both sides every reference token is one learner token, so the projected losses
are the direct path's (to float16 rounding of the stored scores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from rho1.data.loader import IGNORE_INDEX
from rho1.model import position_limit

PROJECTION = "bytes-even-v1"


def _bytes_to_unicode() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes of every token id of a fast tokenizer (None for special tokens): byte-level BPE (GPT-2,
    Llama 3, Qwen, rho1's own) or SentencePiece-style (``▁`` for a space, ``<0xNN>`` byte fallback)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    decoder = json.dumps(spec.get("decoder") or {})
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * max(len(tokenizer), max(vocab.values()) + 1)
    special = set(tokenizer.all_special_ids)
    if "ByteLevel" in decoder:
        table = _bytes_to_unicode()
        for piece, i in vocab.items():
            if i not in special and all(c in table for c in piece):
                out[i] = bytes(table[c] for c in piece)
    elif "\\u2581" in decoder or "▁" in decoder or "Metaspace" in decoder:
        for piece, i in vocab.items():
            if i in special:
                continue
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("▁", " ").encode("utf-8")
    else:
        raise ValueError("--cross-tokenizer needs a byte-level BPE or SentencePiece learner tokenizer (their tokens "
                         "map to bytes); this one is neither")
    return out


def _complete_utf8(data: bytes) -> tuple[int, int]:
    """Bytes to drop at the start (continuation bytes) and at the end (an unfinished character) of ``data``."""
    head = 0
    while head < len(data) and head < 3 and (data[head] & 0xC0) == 0x80:
        head += 1
    tail = 0
    for back in range(1, min(4, len(data) - head) + 1):
        b = data[-back]
        if (b & 0xC0) == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if (b & 0xE0) == 0xC0 else 3 if (b & 0xF0) == 0xE0 else 4
        tail = back if need > back else 0
        break
    return head, tail


class CrossTokenizerReference(torch.nn.Module):
    """A reference model and its tokenizer, scoring windows of another tokenizer's tokens. A module holding the
    model, so it moves, freezes and switches to eval as the model does."""

    cross_tokenizer = True  # rho1.head.batch_token_losses asks this object for its losses

    def __init__(self, model, tokenizer, learner_tokenizer, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("--cross-tokenizer needs a fast (Rust) reference tokenizer, for its character offsets")
        self.learner = ByteTable(token_bytes(learner_tokenizer))
        try:  # the reference's own token bytes give exact spans; character offsets are the fallback
            self.ref = ByteTable(token_bytes(tokenizer))
        except ValueError:
            self.ref = None
        from rho1.data.tokenizer import tokenizer_hash

        self.learner_eos = learner_tokenizer.eos_token_id
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the reference tokenizer has no EOS token, which --cross-tokenizer needs between the "
                             "documents of a window; set tokenizer.eos_token")
        # a BOS gives the reference's first token a prediction; with the learner's own tokenizer, the direct
        # path's windows have none, so neither does this one
        same = tokenizer_hash(tokenizer) == tokenizer_hash(learner_tokenizer)
        self.bos = None if same else tokenizer.bos_token_id
        self.max_length = max_length or (position_limit(model) or 2048)
        self._linear_head: bool | None = None

    @property
    def config(self):
        return self.model.config

    def _windows(self, rows: np.ndarray) -> list[Plan]:
        """The reference ids of each row of learner ids and what each covers (``Plan``); the text of every run
        of normal tokens of the whole batch goes through the reference tokenizer in one call."""
        pieces = []  # (row, position of the run's first token, its last + 1, head, usable, text)
        for b, row in enumerate(rows):
            special = self.learner.special[row]
            starts = np.flatnonzero(~special & np.concatenate([[True], special[:-1]]))
            stops = np.flatnonzero(~special & np.concatenate([special[1:], [True]])) + 1
            for first, stop in zip(starts, stops):
                data = self.learner.join(row[first:stop])[0]
                head, tail = _complete_utf8(data)
                pieces.append((b, int(first), int(stop), head, len(data) - tail,
                               data[head : len(data) - tail].decode("utf-8")))
        enc = self.tokenizer([x[-1] for x in pieces], add_special_tokens=False, return_offsets_mapping=True) \
            if pieces else {"input_ids": [], "offset_mapping": []}
        by_row: list[list] = [[] for _ in rows]
        for piece, ids, offsets in zip(pieces, enc["input_ids"], enc["offset_mapping"]):
            by_row[piece[0]].append((*piece[1:], np.asarray(ids, dtype=np.int64), offsets))
        return [self._plan(row, runs) for row, runs in zip(rows, by_row)]

    def _plan(self, row: np.ndarray, runs: list) -> Plan:
        lengths = self.learner.lengths[row]
        tok_end = np.cumsum(lengths)
        parts = []  # columns of reference tokens: id, kind, start, end, floor, run (see Plan)

        def alone(token_id: int, kind: int) -> None:  # a BOS, or the reference's EOS for a learner special token
            parts.append([np.array([v]) for v in (token_id, kind, 0, 0, 0, -1)])

        if self.bos is not None:
            alone(self.bos, -2)
        at, plan_runs = 0, []
        for r, (first, stop, head, usable, text, ids, offsets) in enumerate(runs):
            for j in range(at, first):
                alone(self.eos, j)
            base = int(tok_end[first] - lengths[first])
            ends = np.maximum.accumulate(np.maximum(head + self._ends(text, ids, offsets), head))
            starts = np.concatenate([[head], ends[:-1]])[: len(ends)]
            n = len(ids)
            parts.append([ids, np.full(n, -1), base + starts, base + ends, np.full(n, base + head), np.full(n, r)])
            plan_runs.append((first, np.concatenate([[0], np.cumsum(lengths[first:stop])]), head, usable))
            at = stop
        for j in range(at, len(row)):
            alone(self.eos, j)
        cols = [np.concatenate([p[i] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
                for i in range(6)]
        return Plan(*cols, tok_end - lengths, tok_end, self.learner.special[row], plan_runs)

    def _ends(self, text: str, ids: np.ndarray, offsets) -> np.ndarray:
        """The byte offset in ``text`` where each reference token ends: from the tokens' own bytes when they
        spell the text (a leading space SentencePiece adds is dropped), else from character offsets (the
        tokens that split one character then all end at its end)."""
        data = text.encode("utf-8")
        if self.ref is not None and (len(ids) == 0 or ids.max() < len(self.ref.special)) and \
                not self.ref.special[ids].any():
            joined, ends = self.ref.join(ids)
            shift = len(joined) - len(data)
            if joined == data or (shift == 1 and joined[:1] == b" " and joined[1:] == data):
                return np.maximum(ends - shift, 0)
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        char_end = np.cumsum(1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000))
        c_end = np.array([e for _, e in offsets], dtype=np.int64)
        return np.where(c_end > 0, char_end[np.maximum(c_end - 1, 0)] if len(char_end) else 0, 0)

    def _batch(self, plans: list[Plan]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(reference ids, their labels, how many leading ids each row lost): every row right-padded, a longer
        one cut to its last max_length ids (the cut part gets no loss)."""
        cut = [max(0, len(p.ref_ids) - self.max_length) for p in plans]
        width = max(1, *(len(p.ref_ids) - c for p, c in zip(plans, cut)))
        batch = torch.full((len(plans), width), self.eos, dtype=torch.long)
        labels = torch.full((len(plans), width), IGNORE_INDEX, dtype=torch.long)
        for b, (plan, c) in enumerate(zip(plans, cut)):
            row = torch.from_numpy(plan.ref_ids[c:].copy())
            if c and self.bos is not None:  # a cut row starts with the BOS too (in place of its first kept id)
                row[0] = self.bos
            batch[b, : len(row)] = row
            if len(row) > 1:
                labels[b, : len(row) - 1] = row[1:]
        return batch, labels, cut

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Projected reference losses, shaped like ``input_ids`` [windows, L]: ``out[b, t]`` is the loss of
        learner token ``t + 1`` given the window (the labels' convention), NaN where there is none."""
        from rho1.head import batch_token_losses, head_is_linear

        device = next(self.model.parameters()).device
        plans = self._windows(input_ids.cpu().numpy())
        batch, labels, cut = self._batch(plans)
        batch = batch.to(device)
        if self._linear_head is None:  # chunked losses, never the [tokens x vocab] logits, when the head allows
            self._linear_head = head_is_linear(self.model, batch[:1, :32])
        ref_loss = batch_token_losses(self.model, batch, labels.to(device),
                                      head_of=self.model if self._linear_head else None).double().cpu().numpy()
        out = np.full(input_ids.shape, np.nan)
        for b, (plan, c) in enumerate(zip(plans, cut)):
            losses = np.full(len(plan.ref_ids), np.nan)  # losses[k]: of reference token k, given the ones before it
            if len(plan.ref_ids) - 1 - c > 0:  # (a row the reference reads as no token at all has none)
                losses[c + 1 :] = ref_loss[b, : len(plan.ref_ids) - 1 - c]
            out[b] = _project(losses, plan, input_ids.shape[1])
        out[:, 0] = np.nan  # the window's first token has no prediction (as in the direct path)
        shifted = np.concatenate([out[:, 1:], np.full((out.shape[0], 1), np.nan)], 1)
        return torch.from_numpy(shifted).float()


class ByteTable:
    """Every token's bytes in one array (special tokens: none), to join the bytes of many tokens at once."""

    def __init__(self, pieces: list[bytes | None]):
        lengths = np.array([-1 if p is None else len(p) for p in pieces], dtype=np.int64)
        self.special = lengths < 0
        self.lengths = np.maximum(lengths, 0)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.flat = np.frombuffer(b"".join(p or b"" for p in pieces), dtype=np.uint8)

    def join(self, ids: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The bytes of ``ids`` one after another, and where each token's bytes end."""
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        index = np.repeat(self.starts[ids] - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        return self.flat[index].tobytes(), ends


@dataclass
class Plan:
    """One learner window as the reference reads it. Per reference token ``k``: ``ref_ids[k]``; ``kind[k]``
    -2 for a BOS, -1 for a token of a run of normal learner tokens, else the position of the learner EOS it
    stands for; the bytes ``[start[k], end[k])`` it covers (window byte offsets, the window's normal tokens'
    bytes one after another), ``floor[k]`` the first usable byte of its run; ``run_of[k]`` its run (-1 for a
    BOS or an EOS). Per learner token ``t``: its bytes ``[tok_start[t], tok_end[t])`` and ``special[t]``.
    ``runs``: (first position, byte offsets of its tokens within the run, head, usable length)."""

    ref_ids: np.ndarray
    kind: np.ndarray
    start: np.ndarray
    end: np.ndarray
    floor: np.ndarray
    run_of: np.ndarray
    tok_start: np.ndarray
    tok_end: np.ndarray
    special: np.ndarray
    runs: list


def _project(losses: np.ndarray, plan: Plan, length: int) -> np.ndarray:
    """Per learner token (positions 0..length-1): the sum of the reference losses spread over its bytes, NaN
    when one of its bytes has no reference loss (not covered, or covered by a token without one)."""
    out = np.full(length, np.nan)
    eos = plan.kind >= 0
    out[plan.kind[eos]] = losses[eos]
    normal = plan.kind == -1
    start, end, floor, loss = plan.start[normal], plan.end[normal], plan.floor[normal], losses[normal]
    empty = end == start  # no byte of its own: onto the last byte before it
    start, end = np.where(empty, np.maximum(end - 1, floor), start), np.where(empty, np.maximum(end, floor + 1), end)
    total = int(plan.tok_end[-1]) if length else 0
    spans = end - start
    token = np.repeat(np.arange(len(spans)), spans)
    byte = np.repeat(start - (np.cumsum(spans) - spans), spans) + np.arange(int(spans.sum()))
    finite = np.isfinite(loss)[token]
    byte_loss = np.bincount(byte[finite], (loss / np.maximum(spans, 1))[token][finite], minlength=total)
    covered = np.bincount(byte[finite], minlength=total)
    blocked = np.bincount(byte[~finite], minlength=total)
    mine = ~plan.special & (plan.tok_end > plan.tok_start)
    a, b = plan.tok_start[mine], plan.tok_end[mine]
    if len(a):  # the normal tokens' bytes tile [0, total): one sum per token, in byte order
        sums = np.add.reduceat(byte_loss, a)
        n_covered, n_blocked = (np.add.reduceat((x > 0).astype(np.int64), a) for x in (covered, blocked))
        whole = (n_covered == b - a) & (n_blocked == 0)
        out[np.flatnonzero(mine)[whole]] = sums[whole]
    return out


def load_reference(name: str, store, cross_tokenizer: bool, dtype=None, trust_remote_code: bool = False):
    """A reference model for ``store``: one that shares its tokenizer (checked), or with ``cross_tokenizer``
    any causal LM with a fast tokenizer, wrapped to project its losses onto the store's tokens."""
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import check_model_fits, load_model

    model = load_model(name, trust_remote_code, dtype=dtype)
    if not cross_tokenizer:
        check_model_fits(model, store, name, cross_tokenizer_hint=True)
        return model
    return CrossTokenizerReference(model, load_tokenizer(name, trust_remote_code), store.tokenizer())
