"""`rho1 score` tokens/s against the plain Hugging Face loop a user would write, and both against this
machine's measured matmul FLOP/s, in one run.

    .venv/bin/python benchmarks/score_throughput.py [--web-docs 1500] [--batch-size 16] [--out runs/bench-throughput]

The plain loop: for each batch of the same windows, ``model(input_ids).logits`` under ``torch.no_grad()``
and ``F.cross_entropy(..., reduction="none")``, same batch size and dtype (float32), losses copied to
NumPy. `rho1 score` is timed as a whole (it also hashes, checks and writes the ScoreStore). Two model
shapes: the demo's tiny Llama (vocabulary 2048) and a Llama with a 32k vocabulary (hidden 256, 4 layers).
Model FLOPs per token = 2 x parameters (embeddings excluded, head included) + 2 x layers x window x hidden
(attention scores and values, causal half); matmul FLOP/s = the best rate of float32 products of square and
LM-head shapes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import SHAPES, web_store
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rho1.data.loader import make_batch
from rho1.score import ScoreConfig, score


def matmul_flops(repeats: int = 5) -> float:
    """The best float32 matmul rate over square products and an LM-head-shaped one (tokens x hidden x vocab)."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (4096, 4096, 4096), (4096, 256, 32768), (4096, 1024, 8192)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if c.tie_word_embeddings:  # the tied head still costs a matmul per token
        params += model.get_output_embeddings().weight.numel()
    return 2 * params + 2 * c.num_hidden_layers * seq_len * c.hidden_size


@torch.no_grad()
def plain_loop(model, store, seq_len: int, batch_size: int) -> float:
    """What a user writes: full logits, then cross_entropy(reduction="none"). Returns seconds."""
    windows = np.arange(store.num_windows(seq_len))
    out = np.full(store.n_tokens, np.nan, dtype=np.float32)
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        batch = make_batch(store, windows[i : i + batch_size], seq_len)
        logits = model(batch.input_ids).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.labels.view(-1), reduction="none")
        keep = (batch.positions >= 0).view(-1)
        out[batch.positions.view(-1)[keep].numpy()] = loss[keep].numpy()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--web-docs", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="runs/bench-throughput")
    args = parser.parse_args()
    out = Path(args.out)
    store = web_store(out, args.web_docs)
    peak = matmul_flops()
    print(f"{store.n_tokens:,} tokens, windows of {args.seq_len}, batch {args.batch_size}, float32; "
          f"matmul {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {"matmul_flops": peak, "tokens": store.n_tokens}
    for shape, dims in SHAPES.items():
        model_dir = out / shape.split()[0] / "model"
        LlamaForCausalLM(LlamaConfig(max_position_embeddings=args.seq_len, tie_word_embeddings=True,
                                     eos_token_id=store.manifest["eos_token_id"], **dims)).save_pretrained(model_dir)
        store.tokenizer().save_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
        fpt = flops_per_token(model, args.seq_len // 2)
        timings = {"plain": [], "rho1": []}
        for repeat in range(2):  # interleaved, best of two
            timings["plain"].append(plain_loop(model, store, args.seq_len, args.batch_size))
            start = time.perf_counter()
            score(ScoreConfig(str(store.path), str(model_dir), str(out / shape.split()[0] / f"scores-{repeat}"),
                              args.seq_len, batch_size=args.batch_size), progress=False)
            timings["rho1"].append(time.perf_counter() - start)
        tps = {k: store.n_tokens / min(v) for k, v in timings.items()}
        results[shape] = {"tokens_per_second": tps, "flops_per_token": fpt,
                          "fraction_of_matmul_peak": {k: v * fpt / peak for k, v in tps.items()}}
        print(f"{shape}: plain HF loop {tps['plain']:,.0f} tokens/s ({tps['plain'] * fpt / peak:.0%} of matmul peak), "
              f"rho1 score {tps['rho1']:,.0f} tokens/s ({tps['rho1'] * fpt / peak:.0%}); "
              f"rho1 / plain {tps['rho1'] / tps['plain']:.2f}x", flush=True)
    (out / "result.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
