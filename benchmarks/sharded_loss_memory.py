"""Peak memory of the SLM loss per rank under FSDP2: from the head's input in chunks (rho1's path) against
full logits, at vocabulary 32k and 8k tokens per rank.

    python benchmarks/sharded_loss_memory.py [--vocab 32000 --tokens 8192 --hidden 256 --repeats 2]

launches `accelerate launch --config_file configs/accelerate/fsdp2.yaml` once per path and repeat, the
paths interleaved, and prints each rank's peak resident memory growth during one training step (forward,
selection at ratio 0.6 over both ranks, backward), its time, and the ratio of the two paths' loss memory (the
growth minus that of the same step with no loss on the head). The model is one
decoder layer, so the head and the loss are most of the step. On CPU (gloo) memory is the process's peak
RSS (``ru_maxrss``) after the step minus before it; on a GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
PATHS = ("chunked", "logits", "none")  # none: the same step without the loss (the rest of the model)


def peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rho1.accel import make_accelerator
    from rho1.head import forward_selection, head_computes

    acc = make_accelerator()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model, optimizer = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    g = torch.Generator().manual_seed(acc.process_index)
    rows = args.tokens // args.seq_len
    ids = torch.randint(0, args.vocab, (rows, args.seq_len), generator=g).to(acc.device)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    ref = (torch.rand(rows, args.seq_len, generator=g) * 10).to(acc.device)
    head = acc.unwrap_model(model) if args.path == "chunked" else None
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    before = peak_mib(acc.device)
    start = time.perf_counter()
    if args.path == "none":  # the step without a loss on the head: the rest of the model's memory
        with head_computes(acc.unwrap_model(model), lambda hidden, weight: hidden.float().sum()):
            loss_sum = model(input_ids=ids).logits
    else:
        loss_sum = forward_selection(model, {"input_ids": ids}, labels, ref, 0.6, head_of=head, gather=acc.gather,
                                     rank=acc.process_index).loss_sum
    loss_sum.backward()
    seconds = time.perf_counter() - start
    grown = peak_mib(acc.device) - before
    result = {"rank": acc.process_index, "path": args.path, "peak_growth_mib": grown, "seconds": seconds,
              "loss": float(acc.reduce(loss_sum.detach(), "sum")),
              "head_rows_per_rank": acc.unwrap_model(model).lm_head.weight.to_local().shape[0]}
    Path(args.result + f".{acc.process_index}").write_text(json.dumps(result))
    acc.end_training()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # set in the workers
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="runs/bench-sharded-loss.json")
    args = parser.parse_args()
    if args.path:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for path in PATHS:  # interleaved
                result = f"{tmp}/{path}-{repeat}"
                cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), __file__,
                       "--path", path, "--result", result, "--vocab", str(args.vocab), "--tokens", str(args.tokens),
                       "--seq-len", str(args.seq_len), "--hidden", str(args.hidden)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(done.stderr[-3000:])
                for rank in (0, 1):
                    runs.append({**json.loads(Path(f"{result}.{rank}").read_text()), "repeat": repeat})
    print(f"vocab {args.vocab:,}, {args.tokens:,} tokens per rank, hidden {args.hidden}, 2 FSDP2 ranks; "
          f"full logits would be {args.tokens * args.vocab * 4 / 2**20:,.0f} MiB in fp32 per rank")
    summary = {}
    for path in PATHS:
        mine = [r for r in runs if r["path"] == path]
        summary[path] = {"peak_growth_mib": max(r["peak_growth_mib"] for r in mine),
                         "seconds": min(r["seconds"] for r in mine), "loss": mine[0]["loss"]}
    base = summary["none"]["peak_growth_mib"]
    for path in ("chunked", "logits"):
        summary[path]["loss_path_mib"] = summary[path]["peak_growth_mib"] - base
        print(f"  {path:8s} peak growth per rank {summary[path]['peak_growth_mib']:7,.0f} MiB, of which the loss path "
              f"{summary[path]['loss_path_mib']:7,.0f} MiB (max over ranks and repeats); step "
              f"{summary[path]['seconds']:.2f}s (best); loss {summary[path]['loss']:.6f}")
    print(f"  the step without the loss: {base:,.0f} MiB ({summary['none']['seconds']:.2f}s)")
    ratio = summary["logits"]["peak_growth_mib"] / summary["chunked"]["peak_growth_mib"]
    print(f"  whole step, full logits / chunked: {ratio:.1f}x the peak memory, "
          f"{summary['logits']['seconds'] / summary['chunked']['seconds']:.2f}x the time (RSS resolves ~50 MiB: a "
          "loss path near 0 stays under the peak the rest of the step sets)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary,
                                          "memory_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
