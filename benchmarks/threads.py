"""CPU threads: `rho1 train` with torch's default thread count (every core) against rho1's default (the
cores idle at start), on an idle machine and next to another busy process, in one run.

    .venv/bin/python benchmarks/threads.py [--repeats 3] [--tokens 100000] [--out runs/bench-threads]

Each case runs `rho1 train` (nano and tiny presets, demo web pages, seq 256, batch 16) as a subprocess
and reads the training time it prints (start-up excluded). Variants are interleaved within each repeat.
The neighbours: another torch job (a matmul loop on torch's default threads, like a second training),
and a single-threaded Python loop. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import web_store

NEIGHBOURS = {
    "idle": None,
    "torch job": "import torch\na = torch.randn(256, 256)\nwhile True:\n    a = (a @ a).tanh()\n",
    "1-thread job": "while True:\n    pass\n",
}


def train_seconds(store: Path, out: Path, preset: str, tokens: int, threads: int | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "rho1", "train", "--data", str(store), "--model-preset", preset, "--seq-len", "256",
           "--batch-size", "16", "--max-tokens", str(tokens), "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(re.search(r"tokens in ([0-9.]+)s", result.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--presets", nargs="+", default=["nano", "tiny"])
    parser.add_argument("--out", default="runs/bench-threads")
    args = parser.parse_args()
    out = Path(args.out)
    store = web_store(out / "data", n_web=600).path
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    variants = {f"torch default ({cores} threads)": cores, "rho1 default": None}
    times: dict[tuple, list[float]] = {}
    for neighbour, code in NEIGHBOURS.items():
        proc = subprocess.Popen([sys.executable, "-c", code]) if code else None
        time.sleep(1.0 if code else 0)
        try:
            for _ in range(args.repeats):
                for preset in args.presets:
                    for name, threads in variants.items():
                        t = train_seconds(store, out / "run", preset, args.tokens, threads)
                        times.setdefault((neighbour, preset, name), []).append(t)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
    print(f"\nrho1 train, {args.tokens:,} tokens, median of {args.repeats} (training seconds, start-up excluded); "
          f"{cores} cores")
    print(f"{'machine':<14} {'preset':<6} " + " ".join(f"{n:>24}" for n in variants) + "   default/rho1")
    for neighbour in NEIGHBOURS:
        for preset in args.presets:
            med = [statistics.median(times[(neighbour, preset, n)]) for n in variants]
            print(f"{neighbour:<14} {preset:<6} " + " ".join(f"{m:>23.2f}s" for m in med) + f"   {med[0] / med[1]:.2f}x")


if __name__ == "__main__":
    main()
