"""MFU as `rho1 train` reports it, for the presets nano, tiny and small and for SmolLM2-135M-Instruct, at 1 and 2
threads: each a short real run on Tiny Shakespeare (its own process, so the thread count is exact), with the
tokens per second, the model FLOPs per second, the peak it is divided by and where that peak comes from.

    .venv/bin/python benchmarks/mfu.py [--data-dir ../shared/data] [--threads 1 2] [--out runs/bench-mfu]

About 6 minutes on 2 CPU cores. Run it alone: the numbers are throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import add_data_dir, check_data_dir
from smollm2 import smollm2_gguf

MODELS = {"nano": (["--model-preset", "nano"], 60, 8), "tiny": (["--model-preset", "tiny"], 40, 8),
          "small": (["--model-preset", "small"], 30, 8), "SmolLM2-135M": (None, 6, 4)}


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/bench-mfu")
    args = parser.parse_args()
    data_dir = check_data_dir(args.data_dir)
    out = Path(args.out)
    rho1 = [sys.executable, "-m", "rho1"]
    text = data_dir / "tinyshakespeare" / "input.txt"
    gguf = str(smollm2_gguf())
    for name, tokenizer in (("bpe", ["--train-tokenizer", "2048"]), ("smollm2", ["--tokenizer", gguf])):
        if not (out / name / "manifest.json").is_file():
            run([*rho1, "prepare", str(text), *tokenizer, "--out", str(out / name), "--overwrite"], 2)
    rows = []
    for model, (preset, steps, batch) in MODELS.items():
        for threads in args.threads:
            folder = out / f"{model}-{threads}"
            store = out / ("smollm2" if preset is None else "bpe")
            cmd = [*rho1, "train", "--data", str(store), *(preset or ["--model", gguf]), "--seq-len", "256",
                   "--batch-size", str(batch), "--max-tokens", str(steps * batch * 256), "--threads", str(threads),
                   "--lr", "1e-4", "--warmup-steps", "1", "--out", str(folder)]
            if not (folder / "summary.json").is_file():
                run(cmd, threads)
            s = json.loads((folder / "summary.json").read_text())
            rows.append({"model": model, "threads": threads, **{k: s[k] for k in (
                "parameters", "tokens_per_second_per_process", "flops_per_token", "mfu", "mfu_not_shown", "peak_flops",
                "peak_flops_from")}})
            r = rows[-1]
            shown = f"{r['mfu']:.1%}" if r["mfu"] is not None else f"not shown ({r['mfu_not_shown']})"
            print(f"{model:<13} {threads} thread(s): {r['parameters'] / 1e6:7.2f}M parameters, "
                  f"{r['tokens_per_second_per_process']:9,.0f} tokens/s, "
                  f"{r['tokens_per_second_per_process'] * r['flops_per_token'] / 1e9:6.1f} GFLOP/s of model FLOPs, "
                  f"MFU {shown} of {r['peak_flops'] / 1e9:.0f} GFLOP/s ({r['peak_flops_from']})", flush=True)
    (out / "result.json").write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if r["mfu"] is None or not 0 < r["mfu"] <= 1]
    print(f"\nMFU in (0, 1] for {len(rows) - len(bad)} of {len(rows)} runs" + (f"; not for {bad}" if bad else ""))


if __name__ == "__main__":
    main()
