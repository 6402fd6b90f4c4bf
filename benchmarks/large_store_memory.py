"""Corpora bigger than one process: a 100M-token store (about 200 MB of uint16 tokens) scored and trained on,
with the resident memory of each stage against the same stage on a 1M-token store, and the speedup of
`rho1 prepare --workers 2`.

    python benchmarks/large_store_memory.py [--data-dir ../shared/data] [--tokens 100000000]

The corpus is GSM8K problems and Tiny Shakespeare passages repeated until it holds --tokens tokens (only its
size matters here). Each stage runs as its CLI command (`rho1 prepare/score/train`) while its resident
memory is sampled from /proc every 0.2 s: RssAnon (the process's own memory, which must not grow with the
store) and RssFile (pages of memory-mapped stores that were read: page cache the kernel can drop at any
time). The model is a micro Llama (one layer, hidden 16): the stages' memory, not the model, is measured.
Run it alone on the machine for the prepare speedup; the memory does not depend on that.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import add_data_dir, check_data_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def rho1(*args: str) -> list[str]:
    return [sys.executable, "-m", "rho1", *args]


def sampled(cmd: list[str]) -> dict:
    """Run ``cmd``; its peak RssAnon / RssFile / VmRSS in MiB, and its seconds."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.2)
    stderr = proc.communicate()[1]
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return {**{k: round(v / 1024, 1) for k, v in peak.items()}, "seconds": round(time.time() - start, 1)}


def documents(data_dir: Path) -> list[str]:
    problems = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()]
    texts = [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems]
    play = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    return texts + [play[i : i + 2000] for i in range(0, len(play), 2000)]


def write_corpus(path: Path, docs: list[str], chars: int, seed: int = 0) -> None:
    """``docs`` shuffled again for every pass, until about ``chars`` characters."""
    rng, written = random.Random(seed), 0
    with open(path, "w") as f:
        while written < chars:
            order = docs[:]
            rng.shuffle(order)
            for text in order:
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)
                if written >= chars:
                    break


def store_tokens(store: Path) -> int:
    return json.loads((store / "manifest.json").read_text())["n_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--small-tokens", type=int, default=1_000_000)
    parser.add_argument("--speedup-tokens", type=int, default=10_000_000, help="corpus size of the --workers runs")
    parser.add_argument("--train-tokens", type=int, default=1_000_000, help="tokens each training run sees")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-large-store"))
    parser.add_argument("--only", choices=["memory", "speedup"], help="one half (the speedup wants the machine alone)")
    args = parser.parse_args()
    data_dir = check_data_dir(args.data_dir)
    out = args.out
    if out.exists() and any(out.iterdir()) and not (out / ".large_store_memory").exists():
        sys.exit(f"--out {out} holds files this benchmark did not write; pass a new folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / ".large_store_memory").touch()
    docs = documents(data_dir)
    write_corpus(out / "small.jsonl", docs, args.small_tokens * 4)
    small = out / "small"
    results = {"prepare small": sampled(rho1("prepare", str(out / "small.jsonl"), "--out", str(small),
                                             "--train-tokenizer", "1024"))}
    chars_per_token = (out / "small.jsonl").stat().st_size / store_tokens(small)
    if args.only != "speedup":
        results |= memory(args, out, docs, small, chars_per_token)
    if args.only != "memory":
        results["prepare_workers"] = speedup(args, out, docs, small, chars_per_token)
    (out / "result.json").write_text(json.dumps(results, indent=2))
    for name in ("small.jsonl", "speedup.jsonl"):
        (out / name).unlink(missing_ok=True)
    print(out / "result.json", file=sys.stderr)


def memory(args, out: Path, docs: list[str], small: Path, chars_per_token: float) -> dict:
    results = {}
    write_corpus(out / "large.jsonl", docs, int(args.tokens * chars_per_token * 1.01), seed=1)
    large = out / "large"
    results["prepare large (--workers 2)"] = sampled(rho1("prepare", str(out / "large.jsonl"), "--out", str(large),
                                                          "--tokenizer", str(small), "--workers", "2"))
    (out / "large.jsonl").unlink()
    sizes = {"small": store_tokens(small), "large": store_tokens(large)}
    print(f"stores: small {sizes['small']:,} tokens, large {sizes['large']:,} tokens "
          f"({(large / 'tokens.bin').stat().st_size / 2**20:,.0f} MiB)", flush=True)

    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((small / "manifest.json").read_text())["vocab_size"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))
    model.save_pretrained(out / "model")
    for name, store in (("small", small), ("large", large)):
        results[f"score {name}"] = sampled(rho1("score", "--data", str(store), "--model", str(out / "model"), "--out",
                                                str(out / f"{name}-scores"), "--seq-len", "256", "--batch-size", "64",
                                                "--threads", "1"))
        print(f"score {name}: {results[f'score {name}']}", flush=True)
        results[f"train {name}"] = sampled(rho1("train", "--data", str(store), "--scores", str(out / f"{name}-scores"),
                                                "--objective", "slm", "--model", str(out / "model"), "--out",
                                                str(out / f"{name}-run"), "--seq-len", "256", "--batch-size", "16",
                                                "--max-tokens", str(args.train_tokens), "--threads", "1"))
        print(f"train {name}: {results[f'train {name}']}", flush=True)

    print(f"\n{'stage':32s} {'RssAnon MiB':>12s} {'RssFile MiB':>12s} {'VmRSS MiB':>10s} {'seconds':>8s}")
    for stage, r in results.items():
        print(f"{stage:32s} {r['RssAnon']:12,.1f} {r['RssFile']:12,.1f} {r['VmRSS']:10,.1f} {r['seconds']:8,.1f}")
    for stage in ("score", "train"):
        grow = results[f"{stage} large"]["RssAnon"] - results[f"{stage} small"]["RssAnon"]
        print(f"{stage}: the process's own memory (RssAnon) with {sizes['large'] / sizes['small']:.0f}x the tokens: "
              f"{grow:+,.1f} MiB")
    return {"sizes": sizes, "stages": results}


def speedup(args, out: Path, docs: list[str], small: Path, chars_per_token: float) -> dict:
    write_corpus(out / "speedup.jsonl", docs, int(args.speedup_tokens * chars_per_token), seed=2)
    times: dict[int, list[float]] = {1: [], 2: []}
    for workers in (1, 2, 1, 2):  # interleaved
        folder = out / f"speedup-{workers}"
        shutil.rmtree(folder, ignore_errors=True)
        times[workers].append(sampled(rho1("prepare", str(out / "speedup.jsonl"), "--out", str(folder),
                                           "--tokenizer", str(small), "--workers", str(workers)))["seconds"])
    same = (out / "speedup-1" / "tokens.bin").read_bytes() == (out / "speedup-2" / "tokens.bin").read_bytes()
    speedup = {"tokens": store_tokens(out / "speedup-1"), "seconds_1_worker": min(times[1]),
               "seconds_2_workers": min(times[2]), "speedup": round(min(times[1]) / min(times[2]), 2),
               "byte_identical": same, "cores": os.cpu_count()}

    print(f"prepare --workers 2 on {speedup['tokens']:,} tokens: {speedup['seconds_2_workers']}s against "
          f"{speedup['seconds_1_worker']}s with one, {speedup['speedup']}x; byte-identical: {same}")
    return speedup


if __name__ == "__main__":
    main()
