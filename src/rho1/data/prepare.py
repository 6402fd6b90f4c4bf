"""`rho1 prepare`: text sources -> TokenStore."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from rho1.config import PrepareConfig
from rho1.data.sources import HF_PREFIX, chat_renderer, expand_sources, read_documents
from rho1.data.store import TOKEN_FORMAT, TokenStore, check_writable, file_record, write_json_atomic
from rho1.data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe
from rho1.lock import check_not_inside, write_lock
from rho1.progress import progress_bar


def resolve_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer by HF name/path; a TokenStore directory means 'the tokenizer of that store'."""
    path = Path(name_or_path)
    if (path / "manifest.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    return load_tokenizer(path if path.exists() else name_or_path, trust_remote_code)


def _encode_batch(tokenizer, docs):
    texts = [d.text for d in docs]
    need_offsets = any(d.target_start not in (None, 0) or d.target_spans for d in docs)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=need_offsets,
                    return_attention_mask=False)
    for i, doc in enumerate(docs):
        ids = enc["input_ids"][i]
        if doc.target_spans is not None:  # a token is target if any of its characters is in an assistant turn
            mask = np.zeros(len(ids) + 1, np.uint8)
            if doc.target_spans:
                bounds = np.array(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
                for lo, hi in doc.target_spans:
                    mask[:-1] |= (bounds[:, 0] < hi) & (bounds[:, 1] > lo)
                mask[-1] = doc.target_spans[-1][1] >= len(doc.text.rstrip())  # the closing EOS, after an answer
        elif doc.target_start is None:
            mask = np.zeros(len(ids) + 1, np.uint8)
        elif doc.target_start == 0:
            mask = np.ones(len(ids) + 1, np.uint8)
        else:
            # a token is a target token if any of its characters is (a space merged into "ĠJanet" is not
            # enough to make it a prompt token)
            ends = np.array([e for _, e in enc["offset_mapping"][i]], dtype=np.int64)
            mask = np.append(ends > doc.target_start, True).astype(np.uint8)  # the closing EOS counts too
        yield ids, mask


def unescape_template(template: str | None) -> str | None:
    """A template typed in a shell: a written \\n or \\t is a newline or tab (\\\\ a backslash)."""
    if template is None:
        return None
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], template)


# what a TokenStore is made of: --overwrite replaces these and nothing else in its folder
STORE_FILES = ("manifest.json", "tokens.bin", "target_mask.bin", "doc_offsets.npy", "doc_labels.npy", "tokenizer")


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` may be new, an empty folder, or (with ``overwrite``) an older TokenStore, or what a replacement
    of one that was killed left (its files without a manifest); never anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; rho1 prepare never replaces a file: choose another --out")
    try:
        is_store = json.loads((out / "manifest.json").read_text()).get("format") == TOKEN_FORMAT
    except (OSError, ValueError, AttributeError):
        is_store = False
    if is_store and not overwrite:
        raise ValueError(f"{out} already holds a TokenStore; pass --overwrite to replace it (ScoreStores made from it "
                         "will no longer match it) or choose another --out")
    half_replaced = overwrite and all(p.name in STORE_FILES for p in out.iterdir())
    if not is_store and not half_replaced and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder that holds other files; choose a new or empty folder")


def move_store_into_place(tmp: Path, out: Path) -> None:
    """The finished store in ``tmp`` becomes ``out``. Over an older store only its own files are replaced
    (the manifest goes first and comes last, so a half-replaced folder is never read as a store); anything
    else in the folder, an export or a note, stays."""
    if not out.exists():
        os.replace(tmp, out)
        return
    (out / "manifest.json").unlink(missing_ok=True)
    for name in STORE_FILES[1:]:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    for name in (*STORE_FILES[1:], "manifest.json"):
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp)


def _tokenizer(cfg: PrepareConfig, texts):
    """(tokenizer, its name in the manifest): a byte-level BPE trained on ``texts``, or the one named."""
    if cfg.train_tokenizer is not None:
        return train_bpe(texts, cfg.train_tokenizer), f"bpe-{cfg.train_tokenizer}"
    return resolve_tokenizer(cfg.tokenizer, cfg.trust_remote_code), cfg.tokenizer


_WORKER_TOKENIZER = None


def _start_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(docs) -> list:
    return [(np.asarray(ids, dtype=np.int64), mask) for ids, mask in _encode_batch(_WORKER_TOKENIZER, docs)]


def _encoded(tokenizer, batches, workers: int):
    """``_encode_batch`` of each batch, in order: here, or in ``workers`` processes (results are taken in the
    order the batches went out, so the bytes written do not depend on the count; at most two batches per
    worker wait, so memory stays flat)."""
    if workers <= 1:
        yield from (_encode_batch(tokenizer, batch) for batch in batches)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker, (tokenizer,)) as pool:
            pending = deque()
            for batch in batches:
                pending.append(pool.submit(_encode_in_worker, batch))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BrokenProcessPool:
        raise ValueError(f"a tokenizing process died (out of memory?); run again with fewer --workers than "
                         f"{workers}") from None


def write_stream(folder: Path, tokenizer, documents, batch_docs: int = 512, progress: bool = True,
                 workers: int = 1) -> dict:
    """Tokenize ``documents`` into ``folder`` (tokens.bin, target_mask.bin when any document has a target
    part, doc_offsets.npy, doc_labels.npy when documents are labelled), each document followed by EOS, in
    ``workers`` processes; returns the counts and hashes for the manifest."""
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    content, hashes = hashlib.sha256(), {"tokens.bin": hashlib.sha256(), "target_mask.bin": hashlib.sha256()}
    offsets, any_target, labels, label_ids, largest = [0], False, {}, [], -1

    def batches():
        docs = iter(documents)
        while batch := list(itertools.islice(docs, batch_docs)):
            label_ids.extend(labels.setdefault(d.label, len(labels)) for d in batch if d.label is not None)
            yield batch

    bar = progress_bar(desc="prepare", unit="tok", unit_scale=True, disable=not progress)
    with open(folder / "tokens.bin", "wb") as ftok, open(folder / "target_mask.bin", "wb") as fmask:
        for encoded in _encoded(tokenizer, batches(), workers):
            before = offsets[-1]
            for ids, mask in encoded:
                arr = np.append(np.asarray(ids, dtype=dtype), np.asarray(tokenizer.eos_token_id, dtype=dtype))
                for f, h, data in ((ftok, hashes["tokens.bin"], arr.tobytes()),
                                   (fmask, hashes["target_mask.bin"], mask.tobytes())):
                    f.write(data)
                    h.update(data)
                    content.update(data)
                any_target |= bool(mask.any())
                largest = max(largest, int(arr.max()))
                offsets.append(offsets[-1] + len(arr))
            bar.update(offsets[-1] - before)
    bar.close()
    if not any_target:
        (folder / "target_mask.bin").unlink()
        del hashes["target_mask.bin"]
    np.save(folder / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    if label_ids:
        np.save(folder / "doc_labels.npy", np.asarray(label_ids, dtype=np.int32), allow_pickle=False)
        hashes["doc_labels.npy"] = hashlib.sha256((folder / "doc_labels.npy").read_bytes())
    return {"labels": list(labels), "dtype": np.dtype(dtype).name, "n_tokens": offsets[-1], "n_docs": len(offsets) - 1,
            "has_target_mask": any_target, "content_hash": content.hexdigest()[:16], "max_token_id": largest,
            "sha256": {name: h.hexdigest() for name, h in hashes.items()}, "files": file_record(folder, hashes)}


def prepare(cfg: PrepareConfig, progress: bool = True) -> TokenStore:
    """Text sources -> a TokenStore at ``cfg.out``, written beside it and moved into place when complete."""
    cfg.check()
    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    check_writable(out)
    check_not_inside(out, [("source", s) for s in cfg.sources if not s.startswith(HF_PREFIX)])
    with write_lock(out, "rho1 prepare"):
        return _prepare(cfg, out, progress)


def _prepare(cfg: PrepareConfig, out: Path, progress: bool) -> TokenStore:
    check_out(out, cfg.overwrite)
    files = expand_sources(cfg.sources)
    template = unescape_template(cfg.template)
    start = time.time()
    chat = None
    if cfg.chat_field:  # the conversations are rendered by the tokenizer's own template
        tokenizer, tokenizer_name = _tokenizer(cfg, ())
        chat = chat_renderer(tokenizer, cfg.chat_field)

    without_answer = [0]  # chats with no assistant turn, counted as they are written

    def documents(count: bool = False):
        for doc in read_documents(files, cfg.text_field, template, cfg.target_field, cfg.split, cfg.label_field, chat):
            without_answer[0] += count and chat is not None and not doc.target_spans
            yield doc

    if next(iter(documents()), None) is None:
        raise ValueError(f"no text found in {', '.join(map(str, files))}; the corpus is empty")
    if chat is None:
        tokenizer, tokenizer_name = _tokenizer(cfg, (d.text for d in documents()))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = write_stream(tmp, tokenizer, documents(count=True), cfg.batch_docs, progress, cfg.workers)
        if chat is not None and without_answer[0] == written["n_docs"]:
            raise ValueError(f"none of the {written['n_docs']:,} chats in --chat-field {cfg.chat_field!r} has an "
                             "assistant turn, so the store would hold no answer token to train on; give each chat "
                             'its {"role": "assistant", ...} replies (or prepare plain text without --chat-field)')
    except BaseException:  # e.g. a bad line far into a jsonl file, read as it streams: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tokenizer.save_pretrained(tmp / "tokenizer")
    seconds = time.time() - start
    manifest = {"format": TOKEN_FORMAT, **{k: written[k] for k in ("dtype", "n_tokens", "n_docs")},
                "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                "tokenizer": {"name": tokenizer_name, "hash": tokenizer_hash(tokenizer)},
                "sources": [str(f) for f in files], "text_field": cfg.text_field, "split": cfg.split,
                "template": template, "target_field": cfg.target_field, "label_field": cfg.label_field,
                "chat_field": cfg.chat_field, **({"chats_without_answer": without_answer[0]} if chat else {}),
                "labels": written["labels"],
                **{k: written[k] for k in ("has_target_mask", "content_hash", "max_token_id", "sha256", "files")},
                "seconds": round(seconds, 3)}
    write_json_atomic(tmp / "manifest.json", manifest)
    move_store_into_place(tmp, out)
    if progress:
        print(f"prepare: {written['n_tokens']:,} tokens in {written['n_docs']:,} documents -> {out} "
              f"({written['n_tokens'] / max(seconds, 1e-9):,.0f} tokens/s, {written['dtype']})")
    if progress and without_answer[0]:
        print(f"prepare: {without_answer[0]:,} of {written['n_docs']:,} chats have no assistant turn: nothing of them "
              "is trained on with --train-on target")
    return TokenStore.open(out)
