"""`rho1 score`: a reference model's per-token loss over a TokenStore -> ScoreStore (computed once, offline).

Scoring is split into chunks of windows. Under `accelerate launch` or `torchrun` each process takes every
N-th chunk and writes its losses straight into the shared ``scores.bin`` (its space reserved up front); a
chunk counts as done only once its bytes are on disk and its marker ``progress/<chunk>`` names this job
and the hash of those bytes. Killed at any point, the same command skips the finished chunks and redoes
the rest, so the result is identical to an uninterrupted run; markers of another job, or whose bytes
changed, count for nothing. The manifest says ``complete: true`` only when every chunk's bytes match.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from rho1.accel import compute_dtype, hold_job_lock, make_accelerator
from rho1.align import PROJECTION, load_reference
from rho1.allocator import keep_freed_memory
from rho1.compute import format_flops, forward_flops_per_token, mfu, peak_flops
from rho1.config import ScoreConfig
from rho1.data.loader import trainable_mask
from rho1.data.store import (
    SCORE_FORMAT,
    ScoreStore,
    TokenStore,
    check_writable,
    file_record,
    read_manifest,
    write_json_atomic,
)
from rho1.data.tokenizer import tokenizer_hash
from rho1.head import linear_head_of, token_losses
from rho1.interrupt import Interrupted, stop_if_ctrl_c
from rho1.lock import check_not_inside
from rho1.model import check_positions, model_hash
from rho1.progress import progress_bar
from rho1.threads import set_threads


def job_id(identity: dict) -> str:
    """What a progress marker says it belongs to: the hash of the job's identity (corpus, model, windows)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _check_same_job(out: Path, identity: dict) -> None:
    """An existing ScoreStore at ``out`` must be this very job (then it is resumed); every process checks,
    before any waits on the others, so a refusal cannot leave a process waiting forever."""
    check_writable(out)
    if not (out / "manifest.json").is_file():
        # what another process may be creating right now is ours; anything else is someone's
        if out.is_dir() and any(p.name not in ("progress", "scores.bin", "manifest.json", "manifest.json.tmp")
                                for p in out.iterdir()):
            raise ValueError(f"--out {out} is a folder that holds other files; choose a new or empty folder")
        return
    manifest = read_manifest(out, "ScoreStore", SCORE_FORMAT)
    for key, value in identity.items():
        # names are as the user spelled them (a relative path, a copy of a model): the hashes decide
        same = (manifest.get(key) or {}).get("hash") == value["hash"] if key == "model" else manifest.get(key) == value
        if key != "token_store" and not same:
            raise ValueError(f"{out} holds scores of another job ({key} differs: {manifest.get(key)!r} vs "
                             f"{value!r}); remove it or write to another --out")


def _reserve(path: Path, n_bytes: int) -> None:
    """``path`` of exactly ``n_bytes``, its blocks allocated now: a full disk is one sentence here, not a
    crash later (a write into a file with no space behind it). Kept as it is when it already has that size."""
    if path.is_file() and path.stat().st_size == n_bytes:
        return
    with open(path, "wb") as f:
        f.truncate(n_bytes)
        try:
            os.posix_fallocate(f.fileno(), 0, max(n_bytes, 1))
        except AttributeError:  # no posix_fallocate (macOS): sparse, as before
            pass
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                path.unlink(missing_ok=True)
                raise OSError(err.errno, f"cannot reserve {n_bytes / 2**20:.1f} MiB for the scores "
                              f"({err.strerror.lower()})", str(path)) from None


def _create(out: Path, identity: dict, n_tokens: int) -> None:
    if (out / "manifest.json").is_file():
        return
    # a folder that lost its manifest keeps its scores.bin and markers: only markers of this job whose
    # bytes still match (checked in _done_chunks) count, so rebuilding in place redoes what it must
    (out / "progress").mkdir(parents=True, exist_ok=True)
    _reserve(out / "scores.bin", n_tokens * 2)  # float16, filled chunk by chunk
    write_json_atomic(out / "manifest.json", {"format": SCORE_FORMAT, "complete": False, **identity})


def _chunk_span(chunk: int, cfg_chunk_windows: int, seq_len: int, n_windows: int, n_tokens: int) -> tuple[int, int]:
    """Tokens [lo, hi) a chunk scores; the chunks tile the store."""
    lo = chunk * cfg_chunk_windows * seq_len
    last = (chunk + 1) * cfg_chunk_windows >= n_windows
    return lo, n_tokens if last else (chunk + 1) * cfg_chunk_windows * seq_len


def _read_span(path: Path, lo: int, hi: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lo * 2)
        return f.read((hi - lo) * 2)


def _mark_done(out: Path, chunk: int, job: str, data: bytes) -> None:
    tmp = out / "progress" / f".{chunk}.tmp"
    tmp.write_text(f"{job} {hashlib.sha256(data).hexdigest()}")
    os.replace(tmp, out / "progress" / str(chunk))


def _done_chunks(out: Path, job: str, spans: list[tuple[int, int]]) -> set[int]:
    """Chunks whose marker belongs to this job and whose bytes in scores.bin are the ones it recorded."""
    done = set()
    progress = out / "progress"
    for p in progress.iterdir() if progress.is_dir() else []:
        if not p.name.isdigit() or int(p.name) >= len(spans):
            continue
        owner, _, digest = p.read_text().partition(" ")
        if owner == job and hashlib.sha256(_read_span(out / "scores.bin", *spans[int(p.name)])).hexdigest() == digest:
            done.add(int(p.name))
    return done


def _reference_model(cfg: ScoreConfig, store: TokenStore, device):
    """The reference model, held in the compute dtype (as `rho1 train --reference` holds it)."""
    model = load_reference(cfg.model, store, cfg.cross_tokenizer, compute_dtype(cfg.precision), cfg.trust_remote_code)
    # (a reference with another tokenizer reads the window's text and cuts it to its own length itself)
    if not cfg.cross_tokenizer:
        check_positions(model, cfg.seq_len, cfg.model)
    return model.to(device)


def _score_chunks(cfg: ScoreConfig, store: TokenStore, model, accelerator, chunks: list[int], job: str,
                  spans: list[tuple[int, int]], progress: bool) -> None:
    """Reference losses of ``chunks`` into scores.bin (written with pwrite, never through a memory map: a full
    disk is then an error, not a crash), each chunk marked done once its bytes are on disk."""
    out, n_windows = Path(cfg.out), store.num_windows(cfg.seq_len)
    # when set, no [tokens x vocab] logits are made (a reference with another tokenizer makes its own)
    head_of = None if cfg.cross_tokenizer else linear_head_of(model, store, cfg.seq_len)
    target = np.asarray(store.target_mask) if cfg.train_on == "target" else None
    bar = progress_bar(total=sum(spans[c][1] - spans[c][0] for c in chunks), desc="score", unit="tok",
                       unit_scale=True, disable=not (progress and accelerator.is_main_process))
    fd = os.open(out / "scores.bin", os.O_RDWR)
    try:
        for chunk in chunks:
            stop_if_ctrl_c()
            windows = np.arange(chunk * cfg.chunk_windows, min((chunk + 1) * cfg.chunk_windows, n_windows))
            lo, hi = spans[chunk]
            losses = token_losses(model, store, cfg.seq_len, cfg.batch_size, windows, autocast=accelerator.autocast,
                                  head_of=head_of, dtype=compute_dtype(cfg.precision), span=(lo, hi))
            if target is not None:  # a prompt token has no score, so no selection ever keeps it
                losses = np.where(target[lo:hi] > 0, losses, np.nan)
            data = losses.astype(np.float16).tobytes()
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], lo * 2 + written)
            os.fsync(fd)
            _mark_done(out, chunk, job, data)
            bar.update(hi - lo)
    except KeyboardInterrupt:
        finished = len(_done_chunks(out, job, spans))
        raise Interrupted(f"interrupted with {finished} of {len(spans)} chunks of {out} scored; run the same "
                          "command again to score the rest") from None
    finally:
        os.close(fd)
        bar.close()


def score(cfg: ScoreConfig, progress: bool = True) -> ScoreStore:
    """Every token's reference loss -> a ScoreStore at ``cfg.out`` (resumed when it holds this job)."""
    cfg.check()
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    keep_freed_memory()
    check_writable(cfg.out)
    store = TokenStore.open(cfg.data).check()
    check_not_inside(cfg.out, {"--data": cfg.data, "--model": cfg.model})
    accelerator = make_accelerator(cfg.precision)
    with contextlib.ExitStack() as lock:
        hold_job_lock(lock, accelerator, cfg.out, "rho1 score")
        return _score(cfg, store, accelerator, progress)


def _score(cfg: ScoreConfig, store: TokenStore, accelerator, progress: bool) -> ScoreStore:
    if cfg.train_on == "target":
        trainable_mask(store, "target")  # one sentence when the store has no target tokens
    began = time.time()
    model = _reference_model(cfg, store, accelerator.device)
    out = Path(cfg.out)
    n_windows = store.num_windows(cfg.seq_len)
    n_chunks = -(-n_windows // cfg.chunk_windows)
    spans = [_chunk_span(c, cfg.chunk_windows, cfg.seq_len, n_windows, store.n_tokens) for c in range(n_chunks)]
    identity = {"token_store": str(store.path.resolve()), "token_store_hash": store.hash,
                "tokenizer_hash": store.tokenizer_hash, "n_tokens": store.n_tokens,
                "model": {"name": cfg.model, "hash": model_hash(cfg.model, model)}, "seq_len": cfg.seq_len,
                "precision": cfg.precision, "chunk_windows": cfg.chunk_windows, "n_chunks": n_chunks}
    if cfg.cross_tokenizer:  # the learner's tokenizer is the store's (tokenizer_hash above)
        identity["cross_tokenizer"] = {"reference_tokenizer_hash": tokenizer_hash(model.tokenizer),
                                       "projection": PROJECTION}
    if cfg.train_on != "all":  # (left out for all: the jobs of earlier ScoreStores keep their ids)
        identity["train_on"] = cfg.train_on
    job = job_id({k: v for k, v in identity.items() if k != "token_store"} | {"model": identity["model"]["hash"]})
    _check_same_job(out, identity)
    if accelerator.is_main_process:
        _create(out, identity, store.n_tokens)
    accelerator.wait_for_everyone()
    done = _done_chunks(out, job, spans) if accelerator.is_main_process else None  # read back once, not per process
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        done = broadcast_object_list([done])[0]
    if accelerator.is_main_process and len(done) < n_chunks:  # chunks will be rewritten: not complete meanwhile
        manifest = read_manifest(out, "ScoreStore", SCORE_FORMAT)
        if manifest.get("complete"):
            write_json_atomic(out / "manifest.json", {"format": SCORE_FORMAT, "complete": False, **identity})
    accelerator.wait_for_everyone()
    mine = [c for c in range(accelerator.process_index, n_chunks, accelerator.num_processes) if c not in done]
    start = time.time()
    _score_chunks(cfg, store, model, accelerator, mine, job, spans, progress)
    tokens_per_second = sum(spans[c][1] - spans[c][0] for c in mine) * accelerator.num_processes / max(
        time.time() - start, 1e-9)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # (a reference with another tokenizer runs on its own tokens: its cost is counted per store token)
        cost = {"flops_per_token": forward_flops_per_token(getattr(model, "model", model), cfg.seq_len),
                "seconds": round(time.time() - began, 3),
                "peak": peak_flops(accelerator.device, cfg.precision)}
        _complete(out, identity, job, spans, tokens_per_second if mine else None, accelerator.num_processes,
                  progress, cost)
    accelerator.wait_for_everyone()
    return ScoreStore.open(out, store)


def _complete(out: Path, identity: dict, job: str, spans: list[tuple[int, int]], tokens_per_second: float | None,
              processes: int, progress: bool, cost: dict) -> None:
    """The manifest says complete, with the hash of the scores, once every chunk is done: each chunk's bytes
    are read back and checked against its marker on the way (nothing is complete without its contents)."""
    digest, total, count, n_tokens = hashlib.sha256(), 0.0, 0, spans[-1][1] if spans else 0
    markers = out / "progress"
    for chunk, (lo, hi) in enumerate(spans):
        data = _read_span(out / "scores.bin", lo, hi)
        marker = markers / str(chunk)
        if not marker.is_file() or marker.read_text() != f"{job} {hashlib.sha256(data).hexdigest()}":
            raise RuntimeError(f"scoring {out} ended with chunk {chunk} missing or changed; run the same command "
                               "again to redo it")
        digest.update(data)
        values = np.frombuffer(data, dtype=np.float16).astype(np.float64)
        finite = np.isfinite(values)
        total, count = total + float(values[finite].sum()), count + int(finite.sum())
    manifest = {"format": SCORE_FORMAT, **identity, "complete": True,
                "sha256": {"scores.bin": digest.hexdigest()}, "files": file_record(out, ["scores.bin"]), "mean_loss": total / count if count else None,
                "tokens_per_second": None if tokens_per_second is None else round(tokens_per_second, 1),
                # what the pass cost: forward FLOPs of every token as scored, and this command's wall time
                "flops": n_tokens * cost["flops_per_token"], "flops_per_token": cost["flops_per_token"],
                "seconds": cost["seconds"]}
    utilisation, why_not = (mfu(tokens_per_second / processes * cost["flops_per_token"], cost["peak"])
                            if tokens_per_second else (None, "nothing was scored"))
    manifest.update(mfu=utilisation, peak_flops=cost["peak"][0], peak_flops_from=cost["peak"][1])
    write_json_atomic(out / "manifest.json", manifest)
    if progress:
        speed = ("nothing left to score" if tokens_per_second is None else
                 f"{tokens_per_second:,.0f} tokens/s over {processes} process(es), "
                 + (f"MFU {utilisation:.1%} of {format_flops(cost['peak'][0])}" if utilisation is not None
                    else f"MFU not shown: {why_not}"))
        mean = "no finite loss" if count == 0 else f"mean reference loss {manifest['mean_loss']:.4f}"
        print(f"score: {n_tokens:,} tokens, {mean} -> {out} ({speed})")
