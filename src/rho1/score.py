"""`rho1 score`: a reference model's per-token loss over a TokenStore -> ScoreStore (computed once, offline).

Scoring is split into chunks of windows. Under `accelerate launch` or `torchrun` each process takes every
N-th chunk and writes its losses straight into the shared ``scores.bin``; a chunk counts as done only
once its bytes are flushed and its marker file ``progress/<chunk>`` exists. Killed at any point, the same
command skips the finished chunks and redoes the rest, so the result is identical to an uninterrupted
run. The manifest says ``complete: true`` only when every chunk is done.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from rho1.accel import compute_dtype, make_accelerator
from rho1.align import PROJECTION, load_reference
from rho1.config import Interrupted, ScoreConfig, stop_if_ctrl_c
from rho1.data.store import (
    SCORE_FORMAT,
    ScoreStore,
    TokenStore,
    check_writable,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from rho1.data.tokenizer import tokenizer_hash
from rho1.head import linear_head_of, token_losses
from rho1.model import model_hash
from rho1.progress import progress_bar
from rho1.threads import set_threads


def _check_same_job(out: Path, identity: dict) -> None:
    """An existing ScoreStore at ``out`` must be this very job (then it is resumed); every process checks,
    before any waits on the others, so a refusal cannot leave a process waiting forever."""
    check_writable(out)
    if not (out / "manifest.json").is_file():
        # what another process may be creating right now is ours; anything else is someone's
        if out.is_dir() and any(p.name not in ("progress", "scores.bin", "manifest.json.tmp") for p in out.iterdir()):
            raise ValueError(f"--out {out} is a folder that holds other files; choose a new or empty folder")
        return
    manifest = read_manifest(out, "ScoreStore", SCORE_FORMAT)
    for key, value in identity.items():
        # names are as the user spelled them (a relative path, a copy of a model): the hashes decide
        same = (manifest.get(key) or {}).get("hash") == value["hash"] if key == "model" else manifest.get(key) == value
        if key != "token_store" and not same:
            raise ValueError(f"{out} holds scores of another job ({key} differs: {manifest.get(key)!r} vs "
                             f"{value!r}); remove it or write to another --out")


def _create(out: Path, identity: dict, n_tokens: int) -> None:
    if (out / "manifest.json").is_file():
        return
    (out / "progress").mkdir(parents=True, exist_ok=True)
    with open(out / "scores.bin", "wb") as f:
        f.truncate(n_tokens * 2)  # float16, filled chunk by chunk
    write_json_atomic(out / "manifest.json", {"format": SCORE_FORMAT, "complete": False, **identity})


def _mark_done(out: Path, chunk: int) -> None:
    tmp = out / "progress" / f".{chunk}.tmp"
    tmp.write_text("")
    os.replace(tmp, out / "progress" / str(chunk))


def _reference_model(cfg: ScoreConfig, store: TokenStore, device):
    """The reference model, held in the compute dtype (as `rho1 train --reference` holds it)."""
    model = load_reference(cfg.model, store, cfg.cross_tokenizer, compute_dtype(cfg.precision), cfg.trust_remote_code)
    # (a reference with another tokenizer reads the window's text and cuts it to its own length itself)
    if not cfg.cross_tokenizer and cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than model {cfg.model} supports "
                         f"({model.config.max_position_embeddings}); pass a smaller --seq-len")
    return model.to(device)


def _score_chunks(cfg: ScoreConfig, store: TokenStore, model, accelerator, chunks: list[int], progress: bool) -> None:
    """Reference losses of ``chunks`` into scores.bin, each chunk marked done once its bytes are flushed."""
    out, n_windows = Path(cfg.out), store.num_windows(cfg.seq_len)
    n_chunks = -(-n_windows // cfg.chunk_windows)
    # when set, no [tokens x vocab] logits are made (a reference with another tokenizer makes its own)
    head_of = None if cfg.cross_tokenizer else linear_head_of(model, store, cfg.seq_len)
    scores = np.memmap(out / "scores.bin", dtype=np.float16, mode="r+", shape=(store.n_tokens,))
    bar = progress_bar(total=len(chunks) * cfg.chunk_windows * cfg.seq_len, desc="score", unit="tok",
                       unit_scale=True, disable=not (progress and accelerator.is_main_process))
    try:
        for chunk in chunks:
            stop_if_ctrl_c()
            windows = np.arange(chunk * cfg.chunk_windows, min((chunk + 1) * cfg.chunk_windows, n_windows))
            lo = int(windows[0]) * cfg.seq_len
            hi = store.n_tokens if chunk == n_chunks - 1 else int(windows[-1] + 1) * cfg.seq_len
            losses = token_losses(model, store, cfg.seq_len, cfg.batch_size, windows, autocast=accelerator.autocast,
                                  head_of=head_of, dtype=compute_dtype(cfg.precision), span=(lo, hi))
            scores[lo:hi] = losses.astype(np.float16)
            scores.flush()
            _mark_done(out, chunk)
            bar.update(len(windows) * cfg.seq_len)
    except KeyboardInterrupt:
        finished = sum(p.name.isdigit() for p in (out / "progress").iterdir())
        raise Interrupted(f"interrupted with {finished} of {n_chunks} chunks of {out} scored; run the same "
                          "command again to score the rest") from None
    finally:
        bar.close()


def score(cfg: ScoreConfig, progress: bool = True) -> ScoreStore:
    """Every token's reference loss -> a ScoreStore at ``cfg.out`` (resumed when it holds this job)."""
    cfg.check()
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    check_writable(cfg.out)
    store = TokenStore.open(cfg.data).verify()
    accelerator = make_accelerator(cfg.precision)
    model = _reference_model(cfg, store, accelerator.device)
    out = Path(cfg.out)
    n_chunks = -(-store.num_windows(cfg.seq_len) // cfg.chunk_windows)
    identity = {"token_store": str(store.path.resolve()), "token_store_hash": store.hash,
                "tokenizer_hash": store.tokenizer_hash, "n_tokens": store.n_tokens,
                "model": {"name": cfg.model, "hash": model_hash(cfg.model, model)}, "seq_len": cfg.seq_len,
                "precision": cfg.precision, "chunk_windows": cfg.chunk_windows, "n_chunks": n_chunks}
    if cfg.cross_tokenizer:  # the learner's tokenizer is the store's (tokenizer_hash above)
        identity["cross_tokenizer"] = {"reference_tokenizer_hash": tokenizer_hash(model.tokenizer),
                                       "projection": PROJECTION}
    _check_same_job(out, identity)
    if accelerator.is_main_process:
        _create(out, identity, store.n_tokens)
    accelerator.wait_for_everyone()
    done = {int(p.name) for p in (out / "progress").iterdir() if p.name.isdigit()}
    mine = [c for c in range(accelerator.process_index, n_chunks, accelerator.num_processes) if c not in done]
    start = time.time()
    _score_chunks(cfg, store, model, accelerator, mine, progress)
    tokens_per_second = len(mine) * cfg.chunk_windows * cfg.seq_len * accelerator.num_processes / max(
        time.time() - start, 1e-9)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _complete(out, identity, store, n_chunks, tokens_per_second, accelerator.num_processes, progress)
    accelerator.wait_for_everyone()
    return ScoreStore.open(out, store)


def _finite_sum(values: np.ndarray, block: int = 1 << 20) -> tuple[float, int]:
    """Sum and count of the finite values, a block at a time (a store of any size in constant memory)."""
    total, count = 0.0, 0
    for start in range(0, len(values), block):
        part = values[start : start + block].astype(np.float64)
        finite = np.isfinite(part)
        total, count = total + float(part[finite].sum()), count + int(finite.sum())
    return total, count


def _complete(out: Path, identity: dict, store: TokenStore, n_chunks: int, tokens_per_second: float, processes: int,
              progress: bool) -> None:
    """The manifest says complete, with the hash of the scores, once every chunk is done."""
    finished = sorted(int(p.name) for p in (out / "progress").iterdir() if p.name.isdigit())
    if finished != list(range(n_chunks)):
        raise RuntimeError(f"scoring {out} ended with chunks missing; run the same command again to finish them")
    total, count = _finite_sum(np.memmap(out / "scores.bin", dtype=np.float16, mode="r", shape=(store.n_tokens,)))
    manifest = {"format": SCORE_FORMAT, **identity, "complete": True, "completed_ranges": [[0, store.n_tokens]],
                "sha256": {"scores.bin": sha256_file(out / "scores.bin")},
                "mean_loss": total / count if count else None,
                "tokens_per_second": round(tokens_per_second, 1)}
    write_json_atomic(out / "manifest.json", manifest)
    if progress:
        print(f"score: {store.n_tokens:,} tokens, mean reference loss {manifest['mean_loss']:.4f} -> {out} "
              f"({manifest['tokens_per_second']:,.0f} tokens/s over {processes} process(es))")
