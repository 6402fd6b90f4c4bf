"""Training step time of SLM relative to CLM, with stored scores and with an online reference, in one run.

    .venv/bin/python benchmarks/step_time.py [--steps 30] [--repeats 3] [--out runs/bench-step]

Two model shapes on the demo web corpus (BPE 2048, windows of 256, batch 8): the demo's tiny Llama
(vocabulary 2048, where the head is small) and a Llama with a 32k vocabulary (hidden 256, 4 layers; the
head holds most of the parameters, as in small LMs). For each, `rho1 train` runs these variants for the
same steps, interleaved and repeated: CLM; SLM (top 60% by excess loss) with a ScoreStore; SLM with an
online reference (`--reference`, the same architecture); and CLM / SLM with `--loss-impl logits` (full
logits, as SLM is usually implemented). Step time = median over the steps after the first 3 of the
per-step wall time, from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import SHAPES, web_store
from transformers import LlamaConfig, LlamaForCausalLM

from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

VARIANTS = {
    "CLM": dict(objective="clm"),
    "SLM stored scores": dict(objective="slm", scores=True),
    "SLM online reference": dict(objective="slm", reference=True),
    "CLM full logits": dict(objective="clm", loss_impl="logits"),
    "SLM full logits": dict(objective="slm", scores=True, loss_impl="logits"),
}


def step_seconds(run: Path, skip: int = 3) -> float:
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    elapsed = [r["tokens"] / r["tokens_per_second"] for r in steps]  # cumulative seconds at each step
    return statistics.median(b - a for a, b in zip(elapsed[skip:], elapsed[skip + 1 :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--out", default="runs/bench-step")
    args = parser.parse_args()
    out = Path(args.out)
    store = web_store(out, 1500)
    seq_len, batch = 256, 8
    results = {}
    for shape, dims in ((name, SHAPES[name]) for name in args.shapes):
        model_dir = out / shape.split()[0] / "model"
        config = LlamaConfig(max_position_embeddings=seq_len, tie_word_embeddings=True,
                             eos_token_id=store.manifest["eos_token_id"], **dims)
        LlamaForCausalLM(config).save_pretrained(model_dir)
        store.tokenizer().save_pretrained(model_dir)
        scores = score(ScoreConfig(str(store.path), str(model_dir), str(out / shape.split()[0] / "scores"), seq_len),
                       progress=False)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):
            for name, variant in VARIANTS.items():
                run = out / shape.split()[0] / f"{name.replace(' ', '-')}-{repeat}"
                kw = {k: v for k, v in variant.items() if k not in ("scores", "reference")}
                train(TrainConfig(data=str(store.path), out=str(run), model=str(model_dir), seq_len=seq_len,
                                  batch_size=batch, max_tokens=args.steps * seq_len * batch, log_every=1,
                                  scores=str(scores.path) if variant.get("scores") else None,
                                  reference=str(model_dir) if variant.get("reference") else None, **kw),
                      progress=False)
                times[name].append(step_seconds(run))
        med = {name: statistics.median(t) for name, t in times.items()}
        results[shape] = {"median": med, "repeats": times}
        print(f"{shape}: " + ", ".join(f"{n} {s * 1000:.0f} ms ({', '.join(f'{x * 1000:.0f}' for x in times[n])})"
                                      for n, s in med.items()), flush=True)
        print(f"  SLM / CLM (stored scores) {med['SLM stored scores'] / med['CLM']:.3f}x; "
              f"SLM online reference / CLM {med['SLM online reference'] / med['CLM']:.3f}x; "
              f"with full logits SLM / CLM {med['SLM full logits'] / med['CLM full logits']:.3f}x; "
              f"rho1 SLM / full-logits CLM {med['SLM stored scores'] / med['CLM full logits']:.3f}x", flush=True)
    (out / "result.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
