"""Time to the first step for a 10M- and a 200M-token store: opening a store costs the same for both.

    .venv/bin/python benchmarks/store_open.py [--sizes 10e6 200e6] [--repeats 3] [--out runs/bench-store-open]

A real demo store and its scores (a nano reference, `rho1 score`) are tiled to each size, with manifests as
`rho1 prepare` and `rho1 score` write them (hashes, sizes, times). For each size, interleaved and repeated:
the open as every stage does it (`check`: sizes and times), the full check it replaced (`verify`: every file
hashed, every id scanned; today `rho1 verify`), and a whole `rho1 train` process of one SLM step on the
store with its scores, start to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import web_store

from rho1.data.store import ScoreStore, TokenStore, file_record, sha256_file
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train


def tiled(src: Path, out: Path, n_tokens: int, files: tuple[str, ...], dtype) -> None:
    """``out`` = ``src`` with each flat file repeated to ``n_tokens`` entries (written in blocks, never whole)."""
    import shutil

    shutil.copytree(src, out, dirs_exist_ok=True)
    for name in files:
        block = np.fromfile(src / name, dtype=dtype)
        with open(out / name, "wb") as f:
            left = n_tokens
            while left > 0:
                part = block[: min(left, len(block))]
                f.write(part.tobytes())
                left -= len(part)


def grow(store: TokenStore, scores: ScoreStore, out: Path, n_tokens: int) -> tuple[Path, Path]:
    tokens, score_dir = out / "tokens", out / "scores"
    if (score_dir / "manifest.json").is_file():
        return tokens, score_dir
    tiled(store.path, tokens, n_tokens, ("tokens.bin",), store.manifest["dtype"])
    (tokens / "target_mask.bin").unlink(missing_ok=True)
    np.save(tokens / "doc_offsets.npy", np.array([0, n_tokens], dtype=np.int64))
    digest = sha256_file(tokens / "tokens.bin")
    m = {**store.manifest, "n_tokens": n_tokens, "n_docs": 1, "has_target_mask": False, "content_hash": digest[:16],
         "sha256": {"tokens.bin": digest}, "files": file_record(tokens, ["tokens.bin"])}
    (tokens / "manifest.json").write_text(json.dumps(m))
    tiled(scores.path, score_dir, n_tokens, ("scores.bin",), np.float16)
    s = {**scores.manifest, "token_store": str(tokens.resolve()), "token_store_hash": m["content_hash"],
         "n_tokens": n_tokens, "sha256": {"scores.bin": sha256_file(score_dir / "scores.bin")},
         "files": file_record(score_dir, ["scores.bin"])}
    (score_dir / "manifest.json").write_text(json.dumps(s))
    return tokens, score_dir


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def first_step(tokens: Path, scores: Path, run: Path, seq_len: int) -> float:
    """A whole `rho1 train` process of one SLM step (the start, the step and the final save)."""
    cmd = [sys.executable, "-m", "rho1", "train", "--data", str(tokens), "--scores", str(scores), "--objective", "slm",
           "--model-preset", "nano", "--seq-len", str(seq_len), "--batch-size", "4", "--max-tokens",
           str(4 * seq_len), "--out", str(run), "--threads", "2"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[10e6, 200e6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-store-open")
    args = parser.parse_args()
    out, seq_len = Path(args.out), 64
    base = out / "base"
    if not (base / "scores" / "manifest.json").is_file():
        store = web_store(base, 300)
        train(TrainConfig(data=str(store.path), out=str(base / "ref"), model_preset="nano", seq_len=seq_len,
                          max_tokens=20_000), progress=False)
        score(ScoreConfig(str(store.path), str(base / "ref" / "final"), str(base / "scores"), seq_len), progress=False)
    store = TokenStore.open(base / "web")
    scores = ScoreStore.open(base / "scores", store)
    paths = {int(n): grow(store, scores, out / f"{int(n) // 10**6}M", int(n)) for n in args.sizes}
    times = {n: {"open (check)": [], "full verify": [], "rho1 train, 1 step": []} for n in paths}
    for repeat in range(args.repeats):
        for n, (tokens, score_dir) in paths.items():
            t = times[n]
            t["open (check)"].append(timed(lambda: ScoreStore.open(score_dir, TokenStore.open(tokens).check()).check()))
            t["full verify"].append(timed(lambda: ScoreStore.open(score_dir, TokenStore.open(tokens).verify()).verify()))
            t["rho1 train, 1 step"].append(first_step(tokens, score_dir, out / "runs" / f"{n}-{repeat}", seq_len))
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    for n, t in times.items():
        print(f"{n / 1e6:,.0f}M tokens: " + "; ".join(f"{k} {statistics.median(v):.3f} s "
                                                     f"({', '.join(f'{x:.3f}' for x in v)})" for k, v in t.items()))
    small, big = min(med), max(med)
    for key in ("open (check)", "full verify", "rho1 train, 1 step"):
        print(f"{key}: {big / 1e6:,.0f}M / {small / 1e6:,.0f}M = {med[big][key] / med[small][key]:.2f}x")
    (out / "result.json").write_text(json.dumps({"times": {str(n): t for n, t in times.items()}}, indent=2))
    print(f"cpu: {cpu_name()}")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + (" (AVX-512)" if "avx512f" in Path("/proc/cpuinfo").read_text()
                                                    else " (AVX2)")
    return "unknown"


if __name__ == "__main__":
    main()
