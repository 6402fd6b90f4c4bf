"""SLM for supervised fine-tuning on real data: full SFT against token selection on the answer tokens, with a
trained reference, with the learner's own history as the reference, with a self-evolving one, with a static
ranking over the whole dataset, and at random, at an equal token budget, over seeds; and the share of right
and of wrong model-written solution tokens each keeps.

    .venv/bin/python benchmarks/sft_efficiency.py [--data-dir ../shared/data] [--presets small] [--seeds 0 1 2]
        [--sft-tokens 600000] [--out runs/bench-sft]

Data (GSM8K and Tiny Shakespeare from --data-dir, the Python standard library's source from this machine):
  general   the base's pretraining text, as setting B of real_data_efficiency.py: Tiny Shakespeare 45-90% and
            1.5 MB of the standard library's source (no math at all);
  clean     GSM8K train problems 0-1999 with their gold answers: what the trained reference is fine-tuned on;
  sft       the noisy SFT set, every record "Question: ...\\nAnswer: ..." with the answer as the target, labelled
            by source: GSM8K train problems 2000-4999 with their gold answers (gold), and the four model-written
            solutions of GSM8K test problems 0-999 (solution_right, solution_wrong: whether the final answer is
            right; their closing "A: N" written "#### N" as the gold answers end, so the format tells nothing);
  heldout   GSM8K test problems 1000-1318 with their gold answers (none of their solutions is in the SFT set);
            the target is the loss on their answer tokens.
Every run starts from the base (pretrained on general text, its own seed) and trains with --train-on target
(the loss on the answer tokens only) at the same budget and data order:
  full          CLM on every answer token (full SFT);
  reference     SLM, top --ratio by excess loss against a reference: the base fine-tuned on the clean part;
  self          SLM with --reference self (the base's own weights, ssToken's retrospective score);
  self-evolving SLM with --reference self --reference-update N (a copy of the learner every N steps);
  static        `rho1 export --selection-scope dataset` (the base's excess loss against the trained reference,
                ranked over the whole SFT set once, as Token Cleaning), trained on with `rho1 train --selection`;
  random        SLM with --score random at --ratio;
  (levers, with --methods) self-ema: --reference self --reference-ema 0.99; self-excess: --reference self
                scored by the paper's excess loss (learner - reference) instead of ssToken's retrospective one.
Token efficiency against full SFT on the held-out target loss (median, min, max over seeds), final losses,
and the share of gold / right / wrong solution tokens each selection keeps. Answer accuracy is not measured:
models of this size solve no GSM8K problem (real_data_efficiency.py found 0-1%), so it would be noise.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import StageTimes, add_data_dir, check_data_dir
from real_data_efficiency import SOLVERS, _jsonl, _passages, _source_code, _write, selected_shares

from rho1.config import ExportConfig, TrainConfig
from rho1.data.export_format import kept_positions
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import TokenStore
from rho1.eval.accuracy import QA_TEMPLATE
from rho1.eval.curves import format_efficiency, read_curve, token_efficiency
from rho1.export import export
from rho1.score import ScoreConfig, score
from rho1.train import train

TARGET = "eval/heldout/target_loss"
METHODS = ("full", "reference", "self", "self-evolving", "static", "random")
EXTRA = ("self-ema", "self-excess")  # levers: --reference-ema 0.99; --reference self scored by the excess loss


def gold_format(solution: str) -> str:
    """A model-written solution closes with "A: 18"; the gold answers with "#### 18"."""
    return re.sub(r"\nA: *([^\n]*)\s*$", r"\n#### \1", solution.rstrip())


def build_corpora(data_dir: Path, out: Path, n_clean: int = 2000, n_gold: int = 3000, n_solved: int = 1000):
    train_set = _jsonl(data_dir / "gsm8k" / "train.jsonl")
    test_set = _jsonl(data_dir / "gsm8k" / "test.jsonl")
    solutions = _jsonl(data_dir / "gsm8k" / "example_model_solutions.jsonl")
    shakespeare = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    a, b = int(len(shakespeare) * 0.45), int(len(shakespeare) * 0.9)
    sft = [{**p, "source": "gold"} for p in train_set[n_clean:n_clean + n_gold]]
    for record in solutions[:n_solved]:
        for solver in (s for s in SOLVERS if s in record):
            right = "right" if record[solver]["is_correct"] else "wrong"
            sft.append({"question": record["question"], "answer": gold_format(record[solver]["solution"]),
                        "source": f"solution_{right}"})
    random.Random(0).shuffle(sft)
    stdlib = _source_code(Path(sysconfig.get_paths()["stdlib"]), 1_500_000, skip=("test", "site-packages"))
    general = [{"text": t} for t in _passages(shakespeare[a:b]) + _passages(stdlib)]
    random.Random(1).shuffle(general)
    heldout_questions = {r["question"] for r in solutions[n_solved:]}
    files = {"general": _write(out / "general.jsonl", general), "clean": _write(out / "clean.jsonl", train_set[:n_clean]),
             "sft": _write(out / "sft.jsonl", sft),
             "heldout": _write(out / "heldout.jsonl", [p for p in test_set if p["question"] in heldout_questions])}
    counts = {"sft records": len(sft), **{f"sft {s}": sum(d["source"] == s for d in sft)
                                           for s in ("gold", "solution_right", "solution_wrong")},
              "clean problems": n_clean, "held-out problems": len(heldout_questions)}
    return files, counts


def prepare_stores(files: dict, out: Path, vocab: int) -> dict:
    def store(name: str, **kw) -> TokenStore:
        if (out / name / "manifest.json").is_file():  # kept from an earlier run of this benchmark
            return TokenStore.open(out / name).verify()
        return prepare(PrepareConfig([str(files[name])], str(out / name), overwrite=True, **kw), progress=False)

    general = store("general", train_tokenizer=vocab, text_field="text")
    qa = dict(template=QA_TEMPLATE, target_field="answer", tokenizer=str(general.path))
    return {"general": general, "clean": store("clean", **qa), "sft": store("sft", label_field="source", **qa),
            "heldout": store("heldout", **qa)}


def static_shares(export_dir: Path, store: TokenStore, seq_len: int) -> dict:
    """Share of each source's answer tokens an export labelled."""
    kept = kept_positions(export_dir, store, seq_len) > 0
    target = np.asarray(store.target_mask) > 0
    labels = store.token_labels(np.arange(store.n_tokens))
    return {name: float(kept[target & (labels == i)].sum() / max(1, (target & (labels == i)).sum()))
            for i, name in enumerate(store.label_names)}


def run_seed(preset: str, seed: int, stores: dict, args, out: Path) -> dict:
    times = stage = StageTimes()
    common = TrainConfig(model_preset=preset, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         log_every=10, threads=args.threads, precision=args.precision)

    def once(folder: Path, cfg: TrainConfig) -> dict:
        done = folder / "summary.json"  # finished by an earlier run of this benchmark: kept
        return json.loads(done.read_text()) if done.is_file() else train(replace(cfg, out=str(folder)), progress=False)

    once(out / "base", replace(common, data=str(stores["general"].path), max_tokens=args.base_tokens, seed=seed + 1000))
    base = str(out / "base" / "final")
    stage("base")
    sft_cfg = replace(common, model=base, lr=args.sft_lr, warmup_steps=10, train_on="target")
    once(out / "reference-model", replace(sft_cfg, data=str(stores["clean"].path), max_tokens=args.reference_tokens,
                                          eval_data=[str(stores["heldout"].path)]))
    reference = str(out / "reference-model" / "final")
    stage("reference")
    scores = out / "scores-sft"
    if not (scores / "manifest.json").is_file() or not json.loads((scores / "manifest.json").read_text())["complete"]:
        score(ScoreConfig(str(stores["sft"].path), reference, str(scores), args.seq_len, train_on="target",
                          threads=args.threads, precision=args.precision), progress=False)
    stage("score")
    export_dir = out / "export-dataset"
    if not (export_dir / "manifest.json").is_file():
        export(ExportConfig(data=str(stores["sft"].path), scores=str(scores), model=base, out=str(export_dir),
                            ratio=args.ratio, selection_scope="dataset", train_on="target", seq_len=args.seq_len,
                            seed=seed, threads=args.threads, precision=args.precision), progress=False)
    stage("export")
    step = args.batch_size * args.seq_len
    run = replace(sft_cfg, data=str(stores["sft"].path), max_tokens=args.sft_tokens,
                  eval_every=max(step, args.sft_tokens // 12 // step * step), eval_data=[str(stores["heldout"].path)])
    steps = -(-args.sft_tokens // step)
    methods = {"full": dict(objective="clm"),
               "reference": dict(objective="slm", ratio=args.ratio, scores=str(scores)),
               "self": dict(objective="slm", ratio=args.ratio, reference="self"),
               "self-evolving": dict(objective="slm", ratio=args.ratio, reference="self",
                                     reference_update=max(1, steps // args.rounds)),
               "static": dict(objective="clm", selection=str(export_dir)),
               "random": dict(objective="slm", ratio=args.ratio, score="random"),
               "self-ema": dict(objective="slm", ratio=args.ratio, reference="self", reference_ema=0.99),
               "self-excess": dict(objective="slm", ratio=args.ratio, reference="self", score="excess")}
    summaries = {}
    for name in args.methods:
        summaries[name] = once(out / name, replace(run, **methods[name]))
        stage(name)
    curves = {name: read_curve(out / name / "metrics.jsonl", TARGET) for name in summaries}
    result = {"preset": preset, "seed": seed, "parameters": summaries["full"]["parameters"],
              "tokens": summaries["full"]["tokens"], "seconds": times,
              "target_loss": {n: s[TARGET] for n, s in summaries.items()},
              "reference_target_loss": json.loads((out / "reference-model" / "summary.json").read_text()).get(TARGET),
              "base_target_loss": curves["full"][0][1] if curves["full"] else None,
              "efficiency": {}, "reached": {},
              "kept_share": {n: selected_shares(out / n) for n in summaries if n not in ("full", "static")}}
    if "static" in summaries:
        result["kept_share"]["static"] = static_shares(export_dir, stores["sft"], args.seq_len)
    for name in summaries:
        if name != "full":
            result["efficiency"][name], result["reached"][name] = token_efficiency(curves["full"], curves[name])
    return result


def report(results: list[dict], counts: dict) -> dict:
    methods = [m for m in results[0]["efficiency"] if all(m in r["efficiency"] for r in results)]
    table = {}
    print(f"\n{results[0]['preset']} ({results[0]['parameters'] / 1e6:.1f}M parameters, {results[0]['tokens']:,} tokens "
          f"per run), {len(results)} seed(s); SFT set: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"{'method':<14} {'efficiency vs full SFT (median, min-max)':<42} {'target loss (median)':<22} "
          "kept: gold / right / wrong (median)")
    for m in ["full", *methods]:
        losses = statistics.median(r["target_loss"][m] for r in results)
        shares = {s: statistics.median(r["kept_share"][m].get(s, float("nan")) for r in results)
                  for s in ("gold", "solution_right", "solution_wrong")} if m in results[0]["kept_share"] else None
        eff = None if m == "full" else [r["efficiency"][m] for r in results]
        table[m] = {"target_loss": losses, "shares": shares,
                    **({} if eff is None else {"median": statistics.median(eff), "min": min(eff), "max": max(eff),
                                               "per_seed": [format_efficiency(r["efficiency"][m], r["reached"][m])
                                                            for r in results]})}
        # "<": some seed never reached full SFT's final loss, so its ratio is only an upper bound
        bound = "" if eff is None or all(r["reached"][m] for r in results) else "< "
        effs = "1.00x (baseline)" if eff is None else (f"{bound}{statistics.median(eff):.2f}x ({min(eff):.2f}-"
                                                       f"{max(eff):.2f}); " + ", ".join(table[m]["per_seed"]))
        kept = "all" if shares is None else " / ".join(f"{v:.0%}" for v in shares.values())
        print(f"{m:<14} {effs:<42} {losses:<22.4f} {kept}")
    for r in results:
        print(f"seed {r['seed']}: base target loss {r['base_target_loss']:.4f}, reference {r['reference_target_loss']:.4f}; "
              "seconds " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA,
                        help=f"default: {' '.join(METHODS)}; also {', '.join(EXTRA)}")
    parser.add_argument("--base-tokens", type=int, default=1_200_000, help="the base's pretraining on general text")
    parser.add_argument("--reference-tokens", type=int, default=800_000, help="the reference's SFT on the clean part "
                        "(about two passes over its 0.4M tokens)")
    parser.add_argument("--sft-tokens", type=int, default=600_000, help="every method's budget (about half a pass "
                        "over the SFT set)")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=3, help="self-evolving: the reference is renewed this many "
                        "times over a run (--reference-update = steps / rounds)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="the base's pretraining")
    parser.add_argument("--sft-lr", type=float, default=1e-3, help="SFT of the reference and of every method")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="bf16 on a GPU")
    parser.add_argument("--out", default="runs/bench-sft")
    parser.add_argument("--result", default="result.json", help="file under OUT the results go to (runs already "
                        "finished under OUT are reused, so levers can be added to an earlier benchmark)")
    args = parser.parse_args()
    if "full" not in args.methods:
        raise SystemExit("--methods must include full: every method is measured against it")
    data_dir = check_data_dir(args.data_dir)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    files, counts = build_corpora(data_dir, out / "data")
    stores = prepare_stores(files, out / "stores", args.vocab)
    counts["sft tokens"] = stores["sft"].n_tokens
    counts["sft answer tokens"] = int(np.asarray(stores["sft"].target_mask).sum())
    print("data: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
    every = {}
    for preset in args.presets:
        results = []
        for seed in args.seeds:
            r = run_seed(preset, seed, stores, args, out / f"{preset}-seed{seed}")
            results.append(r)
            print(f"{preset}/seed {seed}: " + ", ".join(f"{m} {format_efficiency(e, r['reached'][m])}"
                                                        for m, e in r["efficiency"].items()), flush=True)
            (out / args.result).write_text(json.dumps({"counts": counts, "args": vars(args) | {
                "data_dir": str(data_dir)}, "runs": results}, indent=2, default=str))
        every[preset] = {"runs": results, "table": report(results, counts)}
    (out / args.result).write_text(json.dumps({"counts": counts, "args": vars(args) | {"data_dir": str(data_dir)},
                                                 **every}, indent=2, default=str))
    print(f"\n{out / args.result}", file=sys.stderr)


if __name__ == "__main__":
    main()
