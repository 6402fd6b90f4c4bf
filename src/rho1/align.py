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


class CrossTokenizerReference:
    """A reference model and its tokenizer, scoring windows of another tokenizer's tokens."""

    def __init__(self, model, tokenizer, learner_tokenizer, max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("--cross-tokenizer needs a fast (Rust) reference tokenizer, for its character offsets")
        self.learner_bytes = token_bytes(learner_tokenizer)
        try:  # the reference's own token bytes give exact spans; character offsets are the fallback
            self.ref_bytes = token_bytes(tokenizer)
        except ValueError:
            self.ref_bytes = None
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

    cross_tokenizer = True  # rho1.head.batch_token_losses asks this object for its losses

    @property
    def config(self):
        return self.model.config

    @property
    def training(self) -> bool:
        return self.model.training

    def parameters(self):
        return self.model.parameters()

    def to(self, device):
        self.model.to(device)
        return self

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def requires_grad_(self, flag: bool = True):
        self.model.requires_grad_(flag)
        return self

    def _window(self, ids: list[int]) -> tuple[list[int], list, list]:
        """Reference ids of one learner window, and for each reference id what it covers: ("eos", j) for a
        learner EOS at position j, or (run, byte_start, byte_end) inside a run of normal learner tokens."""
        ref_ids = [self.bos] if self.bos is not None else []
        cover: list = [None] * len(ref_ids)
        runs = []  # (first learner position, byte offsets of each learner token, drop_head, usable byte length)
        j = 0
        while j < len(ids):
            if self.learner_bytes[ids[j]] is None:  # EOS (or another special token): the reference's EOS
                ref_ids.append(self.eos)
                cover.append(("eos", j))
                j += 1
                continue
            start = j
            while j < len(ids) and self.learner_bytes[ids[j]] is not None:
                j += 1
            pieces = [self.learner_bytes[t] for t in ids[start:j]]
            data = b"".join(pieces)
            head, tail = _complete_utf8(data)
            text = data[head : len(data) - tail].decode("utf-8")
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            run = len(runs)
            runs.append((start, np.cumsum([0] + [len(p) for p in pieces]), head, len(data) - tail))
            prev = head
            for rid, end in zip(enc["input_ids"], self._ends(text, enc)):
                ref_ids.append(rid)
                cover.append((run, prev, max(head + end, prev)))
                prev = max(head + end, prev)
        return ref_ids, cover, runs

    def _ends(self, text: str, enc) -> list[int]:
        """The byte offset in ``text`` where each reference token ends: from the tokens' own bytes when they
        spell the text (a leading space SentencePiece adds is dropped), else from character offsets (the
        tokens that split one character then all end at its end)."""
        data = text.encode("utf-8")
        if self.ref_bytes is not None:
            pieces = [self.ref_bytes[i] if i < len(self.ref_bytes) else None for i in enc["input_ids"]]
            if all(p is not None for p in pieces):
                joined = b"".join(pieces)
                shift = len(joined) - len(data)
                if joined == data or (shift == 1 and joined[:1] == b" " and joined[1:] == data):
                    return [max(int(e) - shift, 0) for e in np.cumsum([len(p) for p in pieces])]
        char_end = np.cumsum([len(c.encode("utf-8")) for c in text], dtype=np.int64)
        return [int(char_end[c_end - 1]) if c_end > 0 else 0 for _, c_end in enc["offset_mapping"]]

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Projected reference losses, shaped like ``input_ids`` [windows, L]: ``out[b, t]`` is the loss of
        learner token ``t + 1`` given the window (the labels' convention), NaN where there is none."""
        from rho1.head import batch_token_losses, head_is_linear

        device = next(self.model.parameters()).device
        windows = [self._window(row.tolist()) for row in input_ids.cpu()]
        # each row right-padded, longer ones cut to their last max_length ids (the cut part gets no loss)
        cut = [max(0, len(w[0]) - self.max_length) for w in windows]
        width = max(1, *(len(w[0]) - c for w, c in zip(windows, cut)))
        batch = torch.full((len(windows), width), self.eos, dtype=torch.long)
        labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
        for b, ((ref_ids, _, _), c) in enumerate(zip(windows, cut)):
            row = torch.tensor(ref_ids[c:], dtype=torch.long)
            if c and self.bos is not None:  # a cut row starts with the BOS too (in place of its first kept id)
                row[0] = self.bos
            batch[b, : len(row)] = row
            if len(row) > 1:
                labels[b, : len(row) - 1] = row[1:]
        batch = batch.to(device)
        if self._linear_head is None:  # chunked losses, never the [tokens x vocab] logits, when the head allows
            self._linear_head = head_is_linear(self.model, batch[:1, :32])
        ref_loss = batch_token_losses(self.model, batch, labels.to(device),
                                      head_of=self.model if self._linear_head else None).double().cpu()
        out = torch.full(input_ids.shape, float("nan"), dtype=torch.float64)
        for b, ((ref_ids, cover, runs), c) in enumerate(zip(windows, cut)):
            losses = [float("nan")] * len(ref_ids)  # losses[k]: of reference token k, given the ones before it
            for k in range(c + 1, len(ref_ids)):
                losses[k] = float(ref_loss[b, k - 1 - c])
            out[b] = torch.from_numpy(_project(losses, cover, runs, input_ids.shape[1]))
        out[:, 0] = float("nan")  # the window's first token has no prediction (as in the direct path)
        return torch.cat([out[:, 1:], torch.full((out.shape[0], 1), float("nan"), dtype=out.dtype)], 1).float()


def _project(losses: list[float], cover: list, runs: list, length: int) -> np.ndarray:
    """Per learner token (positions 0..length-1): the sum of the reference losses spread over its bytes, NaN
    when one of its bytes has no reference loss (not covered, or covered by a token without one)."""
    out = np.full(length, np.nan)
    byte_loss = [np.zeros(int(r[1][-1])) for r in runs]
    covered = [np.zeros(int(r[1][-1]), dtype=bool) for r in runs]
    blocked = [np.zeros(int(r[1][-1]), dtype=bool) for r in runs]
    for loss, what in zip(losses, cover):
        if what is None:
            continue
        if what[0] == "eos":
            out[what[1]] = loss
            continue
        run, start, end = what
        head = runs[run][2]
        if end == start:  # no byte of its own: onto the last byte before it
            start, end = max(end - 1, head), max(end, head + 1)
        if np.isnan(loss):
            blocked[run][start:end] = True
        else:
            byte_loss[run][start:end] += loss / (end - start)
            covered[run][start:end] = True
    for r, (first, offsets, _, _) in enumerate(runs):
        for i in range(len(offsets) - 1):
            a, b = int(offsets[i]), int(offsets[i + 1])
            if b > a and covered[r][a:b].all() and not blocked[r][a:b].any():
                out[first + i] = byte_loss[r][a:b].sum()
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
