"""Throughput on a real pretrained LLM with a 49k vocabulary, SmolLM2-135M-Instruct, in one run: `rho1 score`
against the plain Hugging Face loop a user would write (full logits, then cross_entropy), and an SLM training
step (stored scores; the loss from the head's input in chunks) against a CLM step and against SLM on full logits.

    .venv/bin/python benchmarks/smollm2_throughput.py [--data-dir ../shared/data] [--out runs/bench-smollm2-speed]

The model is dequantised from its .gguf file once and saved as a plain float32 folder, so a GGUF file's parsing
takes no part in the timings. Scoring: about 4,500 tokens of Tiny Shakespeare in windows of 256, batch 8, the two
interleaved, best of two. Training: 8 steps
of 4 x 256 tokens per variant, the variants interleaved and repeated twice, step time = median of the steps
after the first 2 (from metrics.jsonl). Memory of the loss path (full logits against the chunked selective
cross-entropy) at this shape: `benchmarks/loss_memory.py --tokens 1024 --hidden 576 --vocab 49152`. About 10
minutes on 2 CPU cores; run it alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from common import add_data_dir, check_data_dir
from score_throughput import plain_loop
from smollm2 import smollm2_gguf
from step_time import step_seconds

from rho1.config import PrepareConfig
from rho1.data.prepare import prepare
from rho1.model import load_model
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

VARIANTS = {"CLM": dict(objective="clm"), "SLM stored scores": dict(objective="slm"),
            "SLM full logits": dict(objective="slm", loss_impl="logits")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
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
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    stores = {}
    for name, chars in (("train", 200_000), ("score", 16_000)):  # the scored slice: about 4,500 tokens
        (out / f"{name}.txt").write_text(text[:chars])
        stores[name] = prepare(PrepareConfig([str(out / f"{name}.txt")], str(out / f"{name}-store"),
                                             tokenizer=str(folder), overwrite=True), progress=False)
    store, small = stores["train"], stores["score"]
    model = load_model(str(folder)).eval()
    timings = {"plain": [], "rho1": []}
    for repeat in range(2):  # interleaved, best of two
        timings["plain"].append(plain_loop(model, small, 256, 8))
        started = time.perf_counter()
        score(ScoreConfig(str(small.path), str(folder), str(out / f"scores-{repeat}"), 256, batch_size=8,
                          threads=args.threads), progress=False)
        timings["rho1"].append(time.perf_counter() - started)
    tps = {k: small.n_tokens / min(v) for k, v in timings.items()}
    print(f"scoring {small.n_tokens:,} tokens: plain HF loop {tps['plain']:,.0f} tokens/s, rho1 score "
          f"{tps['rho1']:,.0f} tokens/s (the whole command, load included); rho1 / plain {tps['rho1'] / tps['plain']:.2f}x",
          flush=True)
    scores = score(ScoreConfig(str(store.path), str(folder), str(out / "scores"), 256, batch_size=8,
                               threads=args.threads), progress=False)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, options in VARIANTS.items():
            run = out / "runs" / f"{name.replace(' ', '-')}-{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            train(TrainConfig(data=str(store.path), scores=str(scores.path), model=str(folder), out=str(run),
                              seq_len=256, batch_size=4, max_tokens=args.steps * 4 * 256, lr=5e-5, warmup_steps=1,
                              threads=args.threads, **options), progress=False)
            seconds[name].append(step_seconds(run, skip=2))
    step = {name: statistics.median(v) for name, v in seconds.items()}
    for name, value in step.items():
        print(f"{name}: {value:.2f} s a step ({4 * 256 / value:,.0f} tokens/s); / CLM {value / step['CLM']:.3f}")
    (out / "result.json").write_text(json.dumps({"scoring_tokens_per_second": tps, "step_seconds": step,
                                                 "repeats": seconds}, indent=2))


if __name__ == "__main__":
    main()
