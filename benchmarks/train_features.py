"""What the GPU-run options cost or save on this machine, side by side: MFU of the presets (CLM and SLM), and
--torch-compile, --gradient-checkpointing and --precision bf16 (autocast, float32 master weights) on against
off, each run a fresh `rho1 train` process (so its own
peak resident memory is measured), the variants interleaved.

    .venv/bin/python benchmarks/train_features.py [--steps 30] [--repeats 2] [--threads 2]

Tokens/s and MFU are the medians of the train records after the first three steps (compilation and warm-up
left out); MFU counts 6N + 12LdT FLOPs per token against this CPU's measured float32 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import web_store  # noqa: E402


def run(out: Path, store, scores, preset: str, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "rho1", "train", "--data", str(store), "--model-preset", preset, "--seq-len", "256",
           "--batch-size", "8", "--max-tokens", str(args.steps * 8 * 256), "--warmup-steps", "2", "--threads",
           str(args.threads), "--out", str(out), *extra]
    if scores:
        cmd += ["--objective", "slm", "--scores", str(scores)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read()[-2000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["kind"] == "train"][3:]
    summary = json.loads((out / "summary.json").read_text())  # its peak_rss_mib is the process's own (VmHWM)
    return {"tokens_per_second": float(np.median([r["tokens_per_second_per_process"] for r in steady])),
            "mfu": float(np.median([r["mfu"] for r in steady])), "rss_mib": summary["peak_rss_mib"],
            "parameters": summary["parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-train-features")
    parser.add_argument("--only-options", action="store_true", help="only the tiny preset and the two options")
    args = parser.parse_args()
    out = Path(args.out)
    store = web_store(out, 1500).path
    from rho1.score import ScoreConfig, score
    from rho1.train import TrainConfig, train

    reference = out / "reference"
    train(TrainConfig(data=str(store), out=str(reference), model_preset="tiny", seq_len=256, max_tokens=40_000),
          progress=False)
    scores = score(ScoreConfig(str(store), str(reference / "final"), str(out / "scores"), 256), progress=False).path
    presets = ("tiny",) if args.only_options else ("nano", "tiny", "small")
    variants = {f"{preset} {kind}": (preset, scores if kind == "SLM" else None, ())
                for preset in presets for kind in ("CLM", "SLM")}
    variants |= {"tiny SLM --torch-compile": ("tiny", scores, ("--torch-compile",)),
                 "tiny SLM --gradient-checkpointing": ("tiny", scores, ("--gradient-checkpointing",)),
                 "tiny SLM --precision bf16": ("tiny", scores, ("--precision", "bf16"))}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, (preset, with_scores, extra) in variants.items():
            target = out / f"{name.replace(' ', '_')}-{repeat}"
            results[name].append(run(target, store, with_scores, preset, args, *extra))
            print(f"{name} #{repeat}: {results[name][-1]}", flush=True)
    summary = {name: {k: float(np.median([r[k] for r in runs])) for k in runs[0]} for name, runs in results.items()}
    print(f"\n{args.steps} steps of 8 x 256 tokens, {args.threads} threads, median of {args.repeats} interleaved runs\n")
    print("| run | parameters | tokens/s | MFU | peak RSS (MiB) |\n|---|---|---|---|---|")
    for name, r in summary.items():
        print(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | "
              f"{r['rss_mib']:,.0f} |")
    base = summary["tiny SLM"]
    for option in ("--torch-compile", "--gradient-checkpointing", "--precision bf16"):
        other = summary[f"tiny SLM {option}"]
        print(f"{option} / off at tiny: tokens/s {other['tokens_per_second'] / base['tokens_per_second']:.2f}x, "
              f"peak RSS {other['rss_mib'] / base['rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
