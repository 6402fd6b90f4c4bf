"""What a reference costs under LoRA, on SmolLM2-135M-Instruct: peak memory and step time of SLM-LoRA with each
reference riding on the learner's base (self: the adapters off; self-ema: a second adapter, float32; a trained
adapter loaded as the second adapter) against CLM-LoRA, and against SLM with a separate whole reference model
(LoRA, and full fine-tuning), each variant a `rho1 train` process of its own, the variants interleaved.

    .venv/bin/python benchmarks/smollm2_lora.py [--data-dir ../shared/data] [--repeats 2] [--out runs/bench-lora]

Peak memory is the training's (the process's resident high-water mark set anew once the models are loaded, so
the GGUF file's dequantisation does not hide it), step time the steady tokens/s of one process. About 15 minutes
on 2 CPU cores with the defaults (6 variants x 2 repeats x 8 steps of 4 x 256 tokens, each loading the model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import add_data_dir, check_data_dir, write_jsonl
from smollm2 import smollm2_gguf

from rho1.eval.accuracy import QA_TEMPLATE


def variants(gguf: str, adapter: Path, merged: Path) -> dict[str, list[str]]:
    lora = ["--use-peft", "--lora-r", "16"]
    return {"clm-lora": [*lora, "--objective", "clm"],
            "slm-lora, self (adapters off)": [*lora, "--objective", "slm", "--reference", "self"],
            "slm-lora, self-ema (2nd adapter)": [*lora, "--objective", "slm", "--reference", "self",
                                                 "--reference-ema", "0.99"],
            "slm-lora, trained adapter": [*lora, "--objective", "slm", "--reference", str(adapter)],
            "slm-lora, separate reference model": [*lora, "--objective", "slm", "--reference", str(merged)],
            "slm full, separate reference model": ["--objective", "slm", "--reference", str(merged)]}


def train(args: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "rho1", "train", *args, "--out", str(out), "--threads",
                             str(threads)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_second_per_process"] for r in records if r["kind"] == "train"][2:]  # warm steps
    return {"peak_rss_mib": summary["peak_rss_mib"], "load_peak_rss_mib": summary.get("load_peak_rss_mib"),
            "tokens_per_second": statistics.median(steady), "parameters": summary["parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-lora")
    args = parser.parse_args()
    data_dir = check_data_dir(args.data_dir)
    out, gguf = Path(args.out), str(smollm2_gguf())
    problems = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()]
    common = ["--model", gguf, "--seq-len", "256", "--batch-size", "4", "--lr", "2e-4", "--warmup-steps", "1"]
    rho1 = [sys.executable, "-m", "rho1"]
    for name, rows in (("clean", problems[:40]), ("corpus", problems[40:120])):
        if not (out / "stores" / name / "manifest.json").is_file():
            write_jsonl(out / "data" / f"{name}.jsonl", rows)
            subprocess.run([*rho1, "prepare", str(out / "data" / f"{name}.jsonl"), "--tokenizer", gguf, "--template",
                            QA_TEMPLATE, "--target-field", "answer", "--out", str(out / "stores" / name),
                            "--overwrite"], check=True, capture_output=True)
    reference = out / "reference"  # a trained adapter on the same base (and, merged, a whole reference model)
    if not (reference / "summary.json").is_file():
        train(["--data", str(out / "stores" / "clean"), *common, "--use-peft", "--max-tokens", "8192"], reference,
              args.threads)
    budget = ["--data", str(out / "stores" / "corpus"), *common, "--max-tokens", str(args.steps * 4 * 256)]
    results: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):  # interleaved: a slow moment of the machine hits every variant alike
        for name, extra in variants(gguf, reference / "adapter", reference / "final").items():
            folder = out / "runs" / f"{re.sub(r'[^a-z0-9]+', '-', name)}-{repeat}"
            shutil.rmtree(folder, ignore_errors=True)  # measured anew every time
            results.setdefault(name, []).append(train([*budget, *extra], folder, args.threads))
            print(f"{name}: {results[name][-1]}", flush=True)
    weights_mib = results["clm-lora"][0]["parameters"] * 4 / 2**20  # float32 weights of the model
    base_peak = statistics.median(r["peak_rss_mib"] for r in results["clm-lora"])
    print(f"\nSmolLM2-135M-Instruct, {args.steps} steps of 4 x 256 tokens, {args.threads} threads; its float32 weights "
          f"are {weights_mib:.0f} MiB")
    print(f"{'variant':<38} {'peak RSS (MiB)':>15} {'over CLM-LoRA':>14} {'as weights':>11} {'tokens/s':>9}")
    table = {}
    for name, runs in results.items():
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        speed = statistics.median(r["tokens_per_second"] for r in runs)
        table[name] = {"peak_rss_mib": peak, "over_clm_lora_mib": peak - base_peak,
                       "over_as_share_of_weights": (peak - base_peak) / weights_mib, "tokens_per_second": speed,
                       "runs": runs}
        print(f"{name:<38} {peak:>15,.0f} {peak - base_peak:>+14,.0f} {(peak - base_peak) / weights_mib:>+10.0%} "
              f"{speed:>9.0f}")
    (out / "result.json").write_text(json.dumps({"weights_mib": weights_mib, "table": table}, indent=2))


if __name__ == "__main__":
    main()
