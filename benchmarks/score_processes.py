"""Scoring throughput with 1 and 2 processes on this machine, in one run.

    .venv/bin/python benchmarks/score_processes.py [--preset tiny] [--web-docs 3500] [--out runs/bench-score]

Both runs use every core: 1 process with all threads, or N processes with cores/N threads each (torchrun
sets OMP_NUM_THREADS). Prints tokens/s of each (scoring time only, from the ScoreStore manifest, and whole
command wall time), their ratio, and checks the two ScoreStores are bitwise identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import web_store

from rho1.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--web-docs", type=int, default=3500)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="runs/bench-score")
    args = parser.parse_args()
    out = Path(args.out)
    store = web_store(out, args.web_docs)
    model = build_model(args.preset, store.vocab_size, 2048, store.manifest["eos_token_id"])
    model.save_pretrained(out / "model")
    store.tokenizer().save_pretrained(out / "model")

    cores = os.cpu_count() or 1
    results = {}
    for nproc in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               "rho1", "score", "--data", str(store.path), "--model", str(out / "model"), "--out",
               str(out / f"scores-{nproc}"), "--seq-len", str(args.seq_len), "--batch-size", "16"]
        start = time.time()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wall = time.time() - start
        manifest = json.loads((out / f"scores-{nproc}" / "manifest.json").read_text())
        results[nproc] = {"tokens_per_second": manifest["tokens_per_second"],
                          "wall_tokens_per_second": store.n_tokens / wall, "wall_seconds": wall}
        print(f"{nproc} process(es), {env['OMP_NUM_THREADS']} thread(s) each: "
              f"{manifest['tokens_per_second']:,.0f} tokens/s scoring, {store.n_tokens / wall:,.0f} tokens/s "
              f"whole command ({wall:.1f}s for {store.n_tokens:,} tokens)", flush=True)
    same = (out / "scores-1" / "scores.bin").read_bytes() == (out / "scores-2" / "scores.bin").read_bytes()
    ratio = results[2]["tokens_per_second"] / results[1]["tokens_per_second"]
    wall_ratio = results[2]["wall_tokens_per_second"] / results[1]["wall_tokens_per_second"]
    print(f"2 processes / 1 process: {ratio:.2f}x scoring, {wall_ratio:.2f}x whole command; "
          f"scores bitwise identical: {same}")
    (out / "result.json").write_text(json.dumps({"results": results, "ratio": ratio, "wall_ratio": wall_ratio,
                                                 "identical": same, "cores": cores, "preset": args.preset}, indent=2))


if __name__ == "__main__":
    main()
