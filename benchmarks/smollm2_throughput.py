"""Throughput on a real pretrained LLM with a 49k vocabulary, SmolLM2-135M-Instruct, in one run: `rho1 score`
against the script a user would write instead (benchmarks/plain_score.py: load the model, full logits,
cross_entropy, write float16), both as whole processes; and an SLM training step (stored scores; the loss from
the head's input in chunks) against a CLM step and against SLM on full logits.

    .venv/bin/python benchmarks/smollm2_throughput.py [--data-dir ../shared/data] [--only score|step]
        [--repeats 3] [--threads 2] [--out runs/bench-smollm2-speed]

The model is dequantised from its .gguf file once and saved as a plain float32 folder, so a GGUF file's parsing
takes no part in the timings. Scoring: the first 72,000 characters of Tiny Shakespeare (22,028 tokens) in
windows of 256, batch 8, each command a fresh process (start-up, loading and writing included), the two
interleaved, median of the repeats; MFU = tokens/s x forward FLOPs per token / the cores' peak. Training:
--steps steps of 4 x 256 tokens per variant, the variants interleaved, a run's step time = the median step after
the first 2 (from metrics.jsonl); the ratio to CLM is taken within each repeat (its runs back to back), then the
median over repeats. About 25 minutes on 2 CPU cores with the defaults (5 repeats); run it alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import add_data_dir, check_data_dir
from smollm2 import smollm2_gguf
from step_time import step_seconds

from rho1.compute import cpu_peak_flops, forward_flops_per_token
from rho1.config import PrepareConfig
from rho1.data.prepare import prepare
from rho1.model import load_model
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

VARIANTS = {"CLM": dict(objective="clm"), "SLM stored scores": dict(objective="slm"),
            "SLM full logits": dict(objective="slm", loss_impl="logits")}
HERE = Path(__file__).resolve().parent


def whole(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, done.stdout


def scoring(folder: Path, out: Path, text: Path, store, repeats: int, threads: int) -> dict:
    """`rho1 score` and the plain script as whole processes on the same tokens, interleaved."""
    env_threads = ["env", f"OMP_NUM_THREADS={threads}"]
    plain = [*env_threads, sys.executable, str(HERE / "plain_score.py"), str(folder), str(text), str(out / "plain.bin")]
    seconds, loop = {"plain script": [], "rho1 score": []}, {"plain script": [], "rho1 score": []}
    for repeat in range(repeats):
        took, printed = whole(plain)
        seconds["plain script"].append(took)
        loop["plain script"].append(store.n_tokens / json.loads(printed.splitlines()[-1])["loop_seconds"])
        rho1 = [*env_threads, sys.executable, "-m", "rho1", "score", "--data", str(store.path), "--model", str(folder),
                "--out", str(out / f"scores-{repeat}"), "--seq-len", "256", "--batch-size", "8", "--threads",
                str(threads)]
        shutil.rmtree(out / f"scores-{repeat}", ignore_errors=True)
        seconds["rho1 score"].append(whole(rho1)[0])
        loop["rho1 score"].append(json.loads((out / f"scores-{repeat}" / "manifest.json").read_text())["tokens_per_second"])
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    mine = np.fromfile(out / f"scores-{repeats - 1}" / "scores.bin", dtype=np.float16).astype(np.float32)
    theirs = np.fromfile(out / "plain.bin", dtype=np.float16).astype(np.float32)
    same = np.isfinite(mine) & np.isfinite(theirs)
    per_token = forward_flops_per_token(load_model(str(folder)), 256)
    peak, source = cpu_peak_flops("float32", threads)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    for name, value in med.items():
        tps = store.n_tokens / value
        inner = statistics.median(loop[name])
        print(f"{name}: {value:.2f} s for {store.n_tokens:,} tokens ({tps:,.0f} tokens/s, MFU {tps * per_token / peak:.1%} "
              f"of {peak / 1e9:.0f} GFLOP/s), repeats {', '.join(f'{s:.2f}' for s in seconds[name])}; its scoring "
              f"loop alone {inner:,.0f} tokens/s (MFU {inner * per_token / peak:.1%})")
    ratio = med["plain script"] / med["rho1 score"]
    print(f"rho1 score / plain script: {ratio:.3f}x the tokens/s (whole processes); losses agree within "
          f"{np.abs(mine[same] - theirs[same]).max():.4f} on {same.sum():,} tokens; peak from {source}", flush=True)
    return {"seconds": seconds, "median": med, "speedup": ratio, "loop_tokens_per_second": loop,
            "flops_per_token": per_token, "peak": peak}


def steps(folder: Path, out: Path, data_dir: Path, repeats: int, threads: int, n_steps: int) -> dict:
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    (out / "train.txt").write_text(text[:200_000])
    store = prepare(PrepareConfig([str(out / "train.txt")], str(out / "train-store"), tokenizer=str(folder),
                                  overwrite=True), progress=False)
    shutil.rmtree(out / "scores", ignore_errors=True)  # (scores of an older rho1 are another job)
    scores = score(ScoreConfig(str(store.path), str(folder), str(out / "scores"), 256, batch_size=8, threads=threads),
                   progress=False)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(repeats):
        for name, options in VARIANTS.items():
            run = out / "runs" / f"{name.replace(' ', '-')}-{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            train(TrainConfig(data=str(store.path), scores=str(scores.path), model=str(folder), out=str(run),
                              seq_len=256, batch_size=4, max_tokens=n_steps * 4 * 256, lr=5e-5, warmup_steps=1,
                              threads=threads, **options), progress=False)
            seconds[name].append(step_seconds(run, skip=2))
        print(f"  repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()), flush=True)
    step = {name: statistics.median(v) for name, v in seconds.items()}
    # the ratio within each repeat (its runs back to back, in the same phase of a shared machine), then the median
    paired = {name: [a / b for a, b in zip(v, seconds["CLM"])] for name, v in seconds.items() if name != "CLM"}
    for name, value in step.items():
        shown = "" if name == "CLM" else (f"; / CLM per repeat {', '.join(f'{r:.3f}' for r in paired[name])}, "
                                          f"median {statistics.median(paired[name]):.3f}")
        print(f"{name}: {value:.3f} s a step ({4 * 256 / value:,.0f} tokens/s), repeats "
              f"{', '.join(f'{x:.3f}' for x in seconds[name])}{shown}")
    return {"step_seconds": step, "repeats": seconds, "ratio_per_repeat": paired}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["score", "step"])
    parser.add_argument("--out", default="runs/bench-smollm2-speed")
    args = parser.parse_args()
    data_dir = check_data_dir(args.data_dir)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    folder = out / "smollm2"
    if not (folder / "config.json").is_file():
        from rho1.data.tokenizer import load_tokenizer

        gguf = str(smollm2_gguf())
        load_model(gguf).save_pretrained(folder)
        load_tokenizer(gguf).save_pretrained(folder)
    result = {}
    if args.only != "step":
        text = out / "score.txt"
        text.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:72_000])
        store = prepare(PrepareConfig([str(text)], str(out / "score-store"), tokenizer=str(folder), overwrite=True),
                        progress=False)
        result["score"] = scoring(folder, out, text, store, args.repeats, args.threads)
    if args.only != "score":
        result["step"] = steps(folder, out, data_dir, args.repeats, args.threads, args.steps)
    (out / f"result-{args.only or 'all'}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
