"""Peak memory and time of the loss path (LM head + cross-entropy, forward and backward), plain vs rho1.

    .venv/bin/python benchmarks/loss_memory.py [--tokens 8192] [--hidden 2048] [--vocab 32768 131072]
                                               [--ratio 0.6] [--device cpu|cuda] [--dtype fp32|bf16]

Per vocabulary size, four variants on the same hidden states, head weight, labels and reference losses:
  plain CLM   logits = hidden @ W.T, F.cross_entropy (mean) - what a Hugging Face model computes;
  plain SLM   the same logits, then rho1.selective_loss (top ratio by excess loss) - SLM as usually written;
  rho1 SLM    rho1.selection.selective_linear_cross_entropy at the ratio;
  rho1 CLM    the same at ratio 1.
Peak memory counts what the loss path adds on top of its inputs (hidden, weight, labels, references) up to
the end of the backward, gradients included: on CUDA from torch.cuda.max_memory_allocated, on CPU from the
peak resident set of a fresh process per variant (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rho1.selection import selective_linear_cross_entropy, selective_loss

VARIANTS = ("plain CLM", "plain SLM", "rho1 SLM", "rho1 CLM")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(variant: str, tokens: int, hidden_size: int, vocab: int, ratio: float, device: str, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, hidden_size, generator=g)).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * hidden_size**-0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    ref = (torch.rand(tokens, generator=g) * 5).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    if variant == "plain CLM":
        loss = F.cross_entropy((hidden @ weight.T).float(), labels)
    elif variant == "plain SLM":
        loss = selective_loss(hidden @ weight.T, labels, ref, ratio).loss
    else:
        loss = selective_linear_cross_entropy(hidden, weight, labels, ref, ratio if variant == "rho1 SLM" else 1.0).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "vocab": vocab, "peak_bytes": peak, "seconds": seconds, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one variant in this process (CPU measurement)
    args = parser.parse_args()
    if args.child:
        variant, vocab = args.child.split(":")
        print(json.dumps(run_variant(variant, args.tokens, args.hidden, int(vocab), args.ratio, args.device,
                                     DTYPES[args.dtype])))
        return
    print(f"loss path, {args.tokens:,} tokens x hidden {args.hidden}, {args.dtype} on {args.device}, ratio {args.ratio}")
    for vocab in args.vocab:
        results = {}
        for variant in VARIANTS:
            if args.device == "cpu":  # a fresh process per variant: ru_maxrss is a per-process high-water mark
                cmd = [sys.executable, __file__, "--child", f"{variant}:{vocab}"] + [
                    a for k, v in (("--tokens", args.tokens), ("--hidden", args.hidden), ("--ratio", args.ratio),
                                   ("--device", args.device), ("--dtype", args.dtype)) for a in (k, str(v))]
                result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            else:
                torch.cuda.empty_cache()
                result = run_variant(variant, args.tokens, args.hidden, vocab, args.ratio, args.device,
                                     DTYPES[args.dtype])
            results[variant] = result
            print(f"  vocab {vocab:>7,}  {variant:<10} peak {result['peak_bytes'] / 2**20:>8,.0f} MiB  "
                  f"{result['seconds']:>7.2f} s  loss {result['loss']:.4f}", flush=True)
        mem = lambda a, b: results[a]["peak_bytes"] / results[b]["peak_bytes"]  # noqa: E731
        sec = lambda a, b: results[a]["seconds"] / results[b]["seconds"]  # noqa: E731
        print(f"  vocab {vocab:,}: rho1 SLM / plain SLM memory {mem('rho1 SLM', 'plain SLM'):.2f}x, time "
              f"{sec('rho1 SLM', 'plain SLM'):.2f}x; rho1 CLM / plain CLM memory {mem('rho1 CLM', 'plain CLM'):.2f}x, "
              f"time {sec('rho1 CLM', 'plain CLM'):.2f}x; rho1 SLM / plain CLM time {sec('rho1 SLM', 'plain CLM'):.2f}x")


if __name__ == "__main__":
    main()
