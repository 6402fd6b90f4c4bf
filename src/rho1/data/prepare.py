"""`rho1 prepare`: text sources -> TokenStore."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

from rho1.config import PrepareConfig
from rho1.data.sources import expand_sources, read_documents
from rho1.data.store import TOKEN_FORMAT, TokenStore, replace_dir, write_json_atomic
from rho1.data.tokenizer import load_tokenizer, tokenizer_hash, train_bpe
from rho1.progress import progress_bar


def resolve_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer by HF name/path; a TokenStore directory means 'the tokenizer of that store'."""
    path = Path(name_or_path)
    if (path / "manifest.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    return load_tokenizer(path if path.exists() else name_or_path, trust_remote_code)


def _encode_batch(tokenizer, docs):
    texts = [d.text for d in docs]
    need_offsets = any(d.target_start not in (None, 0) for d in docs)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=need_offsets,
                    return_attention_mask=False)
    for i, doc in enumerate(docs):
        ids = enc["input_ids"][i]
        if doc.target_start is None:
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


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` may be new, an empty folder, or (with ``overwrite``) an older TokenStore; never anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; rho1 prepare never replaces a file: choose another --out")
    try:
        is_store = json.loads((out / "manifest.json").read_text()).get("format") == TOKEN_FORMAT
    except (OSError, ValueError):
        is_store = False
    if is_store and not overwrite:
        raise ValueError(f"{out} already holds a TokenStore; pass --overwrite to replace it (ScoreStores made from it "
                         "will no longer match it) or choose another --out")
    if not is_store and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder that holds other files; choose a new or empty folder")


def prepare(cfg: PrepareConfig, progress: bool = True) -> TokenStore:
    cfg.check()
    out = Path(cfg.out)
    check_out(out, cfg.overwrite)
    files = expand_sources(cfg.sources)
    template = unescape_template(cfg.template)

    def documents():
        return read_documents(files, cfg.text_field, template, cfg.target_field, cfg.split)

    first = next(iter(documents()), None)
    if first is None:
        raise ValueError(f"no text found in {', '.join(map(str, files))}; the corpus is empty")

    start = time.time()
    if cfg.train_tokenizer is not None:
        tokenizer = train_bpe((d.text for d in documents()), cfg.train_tokenizer)
        tokenizer_name = f"bpe-{cfg.train_tokenizer}"
    else:
        tokenizer = resolve_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
        tokenizer_name = cfg.tokenizer
    vocab_size = len(tokenizer)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    eos = tokenizer.eos_token_id

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    content = hashlib.sha256()
    file_hashes = {"tokens.bin": hashlib.sha256(), "target_mask.bin": hashlib.sha256()}
    offsets = [0]
    n_tokens = 0
    any_target = False
    bar = progress_bar(desc="prepare", unit="tok", unit_scale=True, disable=not progress)
    with open(tmp / "tokens.bin", "wb") as ftok, open(tmp / "target_mask.bin", "wb") as fmask:
        docs_iter = documents()
        while batch := list(itertools.islice(docs_iter, cfg.batch_docs)):
            before = n_tokens
            for ids, mask in _encode_batch(tokenizer, batch):
                arr = np.asarray(ids + [eos], dtype=dtype)
                ftok.write(arr.tobytes())
                fmask.write(mask.tobytes())
                content.update(arr.tobytes())
                content.update(mask.tobytes())
                file_hashes["tokens.bin"].update(arr.tobytes())
                file_hashes["target_mask.bin"].update(mask.tobytes())
                any_target |= bool(mask.any())
                n_tokens += len(arr)
                offsets.append(n_tokens)
            bar.update(n_tokens - before)
    bar.close()
    if not any_target:
        (tmp / "target_mask.bin").unlink()
        del file_hashes["target_mask.bin"]
    np.save(tmp / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    tokenizer.save_pretrained(tmp / "tokenizer")
    seconds = time.time() - start
    manifest = {
        "format": TOKEN_FORMAT,
        "dtype": np.dtype(dtype).name,
        "n_tokens": n_tokens,
        "n_docs": len(offsets) - 1,
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "tokenizer": {"name": tokenizer_name, "hash": tokenizer_hash(tokenizer)},
        "sources": [str(f) for f in files],
        "text_field": cfg.text_field,
        "split": cfg.split,
        "template": template,
        "target_field": cfg.target_field,
        "has_target_mask": any_target,
        "content_hash": content.hexdigest()[:16],
        "sha256": {name: h.hexdigest() for name, h in file_hashes.items()},
        "seconds": round(seconds, 3),
    }
    write_json_atomic(tmp / "manifest.json", manifest)
    replace_dir(tmp, out)
    store = TokenStore.open(out)
    if progress:
        print(f"prepare: {n_tokens:,} tokens in {manifest['n_docs']:,} documents -> {out} "
              f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s, {manifest['dtype']})")
    return store
