"""Data efficiency on real data: CLM, SLM, random 60% and a document-level filter at an equal token budget,
in two settings, over seeds, with the share of each source SLM keeps.

    .venv/bin/python benchmarks/real_data_efficiency.py [--data-dir ../shared/data] [--settings A B]
        [--presets small] [--seeds 0 1 2] [--train-tokens 1200000] [--levers ratio=0.4 ratio=0.8 ...] [--out runs/bench-real]

Corpora (GSM8K and Tiny Shakespeare from --data-dir; Python source code from packages installed here):
  reference  GSM8K train problems 0-3999 with their worked answers (clean, target domain);
  noisy      what CLM/SLM train on, each document labelled by source: GSM8K train problems 4000-7472
             (gsm8k), the four model-written solutions of GSM8K test problems 0-999 (solution_right,
             solution_wrong), Tiny Shakespeare's first 45% (shakespeare), and 1 MB of numpy's Python source
             (code; numpy is BSD-3-Clause), in 1,500-character passages;
  general    setting B's base pretraining text, disjoint from the noisy corpus: Tiny Shakespeare 45-90% and
             1.5 MB of the Python standard library's source (PSF License 2.0);
  heldout    GSM8K test problems 1000-1318 (none of their model solutions is in the corpus); target loss =
             loss on their answer tokens;
  offtarget  Tiny Shakespeare's last 10%.
Setting A (from scratch): the reference is a fresh model trained on the clean GSM8K part; every method starts
from a fresh model. Setting B (continual, as in the paper): a base is pretrained on the general text; the
reference is the base trained further on the clean math; every method continues from the base.
Methods at the same budget and data order: CLM, SLM (top 60% by excess loss), random 60%, and the filter a
user would try first: the documents with the highest mean excess loss under the starting model, 60% of the
tokens, trained on with CLM. With --levers, more SLM runs at the first seed, each with one change to the recipe: ratio,
learning rate (against a CLM at the same rate), selection scope, a reference trained longer or larger.
Prints token efficiency against CLM (median, min, max over seeds), final target and off-target losses, the
share of each source SLM selects, and writes everything with stage times to OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import SOLVERS, StageTimes, add_data_dir, check_data_dir
from common import read_jsonl as _jsonl
from common import write_jsonl as _write
from static_selection import static_run

from rho1.config import TrainConfig
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import ScoreStore, TokenStore
from rho1.eval.accuracy import QA_TEMPLATE
from rho1.eval.curves import format_efficiency, read_curve, token_efficiency
from rho1.head import linear_head_of, token_losses
from rho1.model import build_model, load_model
from rho1.score import ScoreConfig, score
from rho1.train import train

TARGET, OFF = "eval/heldout/target_loss", "eval/offtarget/loss"


def _passages(text: str, size: int = 1500) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size) if text[i : i + size].strip()]


def _source_code(root: Path, budget: int, skip: tuple[str, ...] = ("test",)) -> str:
    """The first ``budget`` characters of the .py files under ``root`` (sorted, test files left out)."""
    parts, size = [], 0
    for f in sorted(root.rglob("*.py")):
        if any(s in f.as_posix() for s in skip):
            continue
        text = f.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size >= budget:
            break
    return "".join(parts)[:budget]


def build_corpora(data_dir: Path, out: Path, n_reference: int = 4000, n_solved: int = 1000) -> tuple[dict, dict]:
    train_set = _jsonl(data_dir / "gsm8k" / "train.jsonl")
    test_set = _jsonl(data_dir / "gsm8k" / "test.jsonl")
    solutions = _jsonl(data_dir / "gsm8k" / "example_model_solutions.jsonl")
    shakespeare = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    a, b = int(len(shakespeare) * 0.45), int(len(shakespeare) * 0.9)
    noisy = [{"text": QA_TEMPLATE.format(**p), "source": "gsm8k"} for p in train_set[n_reference:]]
    for record in solutions[:n_solved]:
        for solver in (s for s in SOLVERS if s in record):
            right = "right" if record[solver]["is_correct"] else "wrong"
            noisy.append({"text": QA_TEMPLATE.format(question=record["question"], answer=record[solver]["solution"]),
                          "source": f"solution_{right}"})
    noisy += [{"text": t, "source": "shakespeare"} for t in _passages(shakespeare[:a])]
    import numpy

    noisy += [{"text": t, "source": "code"} for t in _passages(_source_code(Path(numpy.__file__).parent, 1_000_000))]
    random.Random(0).shuffle(noisy)  # documents of each kind spread over the store
    stdlib = _source_code(Path(sysconfig.get_paths()["stdlib"]), 1_500_000, skip=("test", "site-packages"))
    general = [{"text": t} for t in _passages(shakespeare[a:b]) + _passages(stdlib)]
    random.Random(1).shuffle(general)
    heldout_questions = {r["question"] for r in solutions[n_solved:]}
    files = {"reference": _write(out / "reference.jsonl", train_set[:n_reference]),
             "noisy": _write(out / "noisy.jsonl", noisy),
             "general": _write(out / "general.jsonl", general),
             "heldout": _write(out / "heldout.jsonl", [p for p in test_set if p["question"] in heldout_questions]),
             "offtarget": _write(out / "offtarget.jsonl", [{"text": t} for t in _passages(shakespeare[b:])])}
    counts = {"noisy documents": len(noisy), **{f"noisy {s}": sum(d["source"] == s for d in noisy) for s in
                                                ("gsm8k", "solution_right", "solution_wrong", "shakespeare", "code")},
              "general documents": len(general), "held-out problems": sum(1 for _ in open(files["heldout"]))}
    return files, counts


def prepare_stores(files: dict, out: Path, vocab: int) -> dict:
    """The TokenStores (those an earlier run of this benchmark made are kept: other runs may be reading them)."""
    def store(name: str, **kw) -> TokenStore:
        if (out / name / "manifest.json").is_file():
            return TokenStore.open(out / name).verify()
        return prepare(PrepareConfig([str(files[name])], str(out / name), overwrite=True, **kw), progress=False)

    noisy = store("noisy", train_tokenizer=vocab, label_field="source")
    math = dict(template=QA_TEMPLATE, target_field="answer", tokenizer=str(noisy.path))
    return {"noisy": noisy, "reference": store("reference", **math), "heldout": store("heldout", **math),
            "general": store("general", tokenizer=str(noisy.path)), "offtarget": store("offtarget", tokenizer=str(noisy.path))}


def document_filter(stores: dict, start_model: str, scores: ScoreStore, noisy_file: Path, out: Path, ratio: float,
                    seq_len: int) -> TokenStore:
    """The documents with the highest mean excess loss under ``start_model``, ``ratio`` of the tokens, as a store."""
    store = stores["noisy"]
    import torch

    model = load_model(start_model).to("cuda" if torch.cuda.is_available() else "cpu")
    learner = token_losses(model, store, seq_len, 32, head_of=linear_head_of(model, store, seq_len))
    excess = learner - np.asarray(scores.scores, np.float32)
    offsets = store.doc_offsets
    means = np.array([np.nanmean(excess[a:b]) if np.isfinite(excess[a:b]).any() else -np.inf
                      for a, b in zip(offsets[:-1], offsets[1:])])
    lengths = np.diff(offsets)
    keep, kept = [], 0
    for doc in np.argsort(-means, kind="stable"):
        if kept >= ratio * store.n_tokens:
            break
        keep.append(int(doc))
        kept += int(lengths[doc])
    records = _jsonl(noisy_file)
    path = _write(out / "filtered.jsonl", [records[i] for i in sorted(keep)])
    return prepare(PrepareConfig([str(path)], str(out / "filtered"), tokenizer=str(store.path), label_field="source",
                                 overwrite=True), progress=False)


LEVERS = {"ratio": float, "lr": float, "selection_scope": str, "reference_tokens": int, "reference_preset": str,
          "rule": str, "temperature": float, "threshold": float}


def parse_lever(text: str) -> dict:
    """``ratio=0.8`` or ``reference_tokens=2400000,reference_preset=medium``: one SLM run with those changes;
    ``static``: rho1 export against the starting model, trained on by a plain transformers.Trainer."""
    if text == "static":
        return {"static": True}
    lever = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in LEVERS or not value:
            raise SystemExit(f"lever {text!r}: use key=value with a key among {', '.join(LEVERS)}")
        lever[key] = LEVERS[key](value)
    return lever


def run_setting(setting: str, preset: str, seed: int, stores: dict, files: dict, args, out: Path,
                levers: list[str]) -> dict:
    times = stage = StageTimes()
    common = TrainConfig(model_preset=preset, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         log_every=10, threads=args.threads, precision=args.precision)
    if setting == "B":
        train(replace(common, data=str(stores["general"].path), out=str(out / "base"), max_tokens=args.base_tokens,
                      seed=seed + 1000), progress=False)
        common = replace(common, model=str(out / "base" / "final"))
        stage("base")
        start_model = str(out / "base" / "final")
    else:
        start_model = str(out / "initial")
        build_model(preset, stores["noisy"].vocab_size, 2048, stores["noisy"].manifest["eos_token_id"],
                    seed=seed).save_pretrained(start_model)
        stores["noisy"].tokenizer().save_pretrained(start_model)
    references: dict[tuple, dict] = {}

    def reference(ref_preset: str, tokens: int) -> dict:
        """Train a reference (B: from the base, so only at the learner's size) and score the stores with it."""
        key = (ref_preset, tokens)
        if key not in references:
            name = "reference" if key == (args.reference_preset or preset, args.reference_tokens) else \
                f"reference-{ref_preset}-{tokens}"
            cfg = replace(common, data=str(stores["reference"].path), out=str(out / name), max_tokens=tokens)
            if ref_preset != preset:
                if setting == "B":
                    raise SystemExit("setting B continues the reference from the base: a larger reference needs a "
                                     "base of its size; use reference_preset in setting A only")
                cfg = replace(cfg, model_preset=ref_preset)
            if not (out / name / "summary.json").is_file():  # a finished reference of an earlier run is kept
                train(cfg, progress=False)
            ref = str(out / name / "final")
            references[key] = {s: score(ScoreConfig(str(stores[s].path), ref, str(out / f"scores-{s}" if name ==
                                                                                 "reference" else out / name / s),
                                                    args.seq_len, precision=args.precision, threads=args.threads),
                                        progress=False)
                               for s in ("noisy", "heldout")}
            stage(name)
        return references[key]

    scores = reference(args.reference_preset or preset, args.reference_tokens)
    step = args.batch_size * args.seq_len
    run = replace(common, data=str(stores["noisy"].path), scores=str(scores["noisy"].path), max_tokens=args.train_tokens,
                  eval_every=max(step, args.train_tokens // 12 // step * step),
                  eval_data=[str(stores["heldout"].path), str(stores["offtarget"].path)],
                  eval_scores=[str(scores["heldout"].path), ""])
    methods = {"clm": dict(objective="clm"), "slm": dict(objective="slm", ratio=args.ratio),
               "random": dict(objective="slm", ratio=args.ratio, score="random")}
    summaries, folders, baseline = {}, {}, {}

    def run_method(name: str, cfg: TrainConfig, folder: str | None = None) -> None:
        folders[name] = out / (folder or name)
        done = folders[name] / "summary.json"  # finished by an earlier run of this benchmark: kept
        summaries[name] = json.loads(done.read_text()) if done.is_file() else train(
            replace(cfg, out=str(folders[name])), progress=False)
        stage(name)

    for name, kw in methods.items():
        run_method(name, replace(run, **kw))
    if not (out / "document" / "summary.json").is_file():
        document_filter(stores, start_model, scores["noisy"], files["noisy"], out, args.ratio, args.seq_len)
    run_method("document", replace(run, data=str(out / "filtered"), scores=None, objective="clm"))
    for text in levers:  # one SLM run per lever; a learning-rate lever gets its own CLM to compare against
        lever = parse_lever(text)
        if lever.get("static"):
            folders[text] = out / "lever-static"
            summaries[text] = static_run(replace(run, ratio=args.ratio), start_model, str(scores["noisy"].path),
                                         folders[text], args.precision)
            stage(text)
            continue
        ref = reference(lever.pop("reference_preset", args.reference_preset or preset),
                        lever.pop("reference_tokens", args.reference_tokens))
        cfg = replace(run, scores=str(ref["noisy"].path), eval_scores=[str(ref["heldout"].path), ""],
                      objective="slm", ratio=args.ratio)
        if "lr" in lever:
            baseline[text] = f"clm-lr{lever['lr']:g}"
            if baseline[text] not in summaries:
                run_method(baseline[text], replace(run, objective="clm", lr=lever["lr"]))
        run_method(text, replace(cfg, **lever), folder="lever-" + text.replace("=", "-").replace(",", "_"))
    curves = {name: read_curve(folders[name] / "metrics.jsonl", TARGET) for name in summaries}
    result = {"setting": setting, "preset": preset, "seed": seed, "parameters": summaries["clm"]["parameters"],
              "tokens": summaries["clm"]["tokens"], "seconds": times,
              "target_loss": {n: s[TARGET] for n, s in summaries.items()},
              "offtarget_loss": {n: s[OFF] for n, s in summaries.items()},
              "reference_target_loss": {f"{p}/{t}": reference_loss(r["heldout"], stores["heldout"])
                                        for (p, t), r in references.items()},
              "efficiency": {}, "reached": {}, "baseline": baseline,
              "selected_share": {n: selected_shares(folders[n]) for n in summaries
                                 if n not in ("clm", "document", "static") and not n.startswith("clm-")}}
    for name in summaries:
        if name != "clm" and not name.startswith("clm-"):
            base = curves[baseline.get(name, "clm")]
            result["efficiency"][name], result["reached"][name] = token_efficiency(base, curves[name])
    return result


def reference_loss(scores: ScoreStore, store: TokenStore) -> float:
    """The reference's mean loss on the held-out target tokens: what the learner can be steered towards."""
    mask = np.asarray(store.target_mask, bool)
    return float(np.nanmean(np.asarray(scores.scores, np.float32)[mask]))


def selected_shares(run: Path) -> dict:
    """Share of each source's tokens SLM selected over the whole run (token-weighted)."""
    totals: dict[str, list[float]] = {}
    for line in open(run / "metrics.jsonl"):
        r = json.loads(line)
        for key, value in r.items():
            if key.startswith("label/") and key.endswith("/tokens") and value:
                name = key.split("/")[1]
                t = totals.setdefault(name, [0.0, 0.0])
                t[0] += value
                t[1] += value * r[f"label/{name}/frac_selected"]
    return {name: sel / tok for name, (tok, sel) in sorted(totals.items())}


def report(results: list[dict]) -> dict:
    table = {}
    for setting in sorted({r["setting"] for r in results}):
        for preset in sorted({r["preset"] for r in results}):
            rows = [r for r in results if r["setting"] == setting and r["preset"] == preset]
            if not rows:
                continue
            methods = [m for m in rows[0]["efficiency"] if all(m in r["efficiency"] for r in rows)]
            line = {m: {"median": statistics.median(r["efficiency"][m] for r in rows),
                        "min": min(r["efficiency"][m] for r in rows), "max": max(r["efficiency"][m] for r in rows)}
                    for m in methods}
            table[f"{setting}/{preset}"] = line
            print(f"\nsetting {setting}, {preset} ({rows[0]['parameters'] / 1e6:.1f}M parameters, "
                  f"{rows[0]['tokens']:,} tokens per run), {len(rows)} seed(s): token efficiency against CLM")
            for m in methods:
                print(f"  {m:<10} median {line[m]['median']:.2f}x  (min {line[m]['min']:.2f}x, max {line[m]['max']:.2f}x)"
                      "  per seed: " + ", ".join(format_efficiency(r["efficiency"][m], r["reached"][m]) for r in rows))
            for r in rows:
                levers = [m for m in r["efficiency"] if m not in methods]
                if levers:
                    print(f"  levers, seed {r['seed']}: " + ", ".join(
                        f"{m} {format_efficiency(r['efficiency'][m], r['reached'][m])}" for m in levers))
                print(f"  seed {r['seed']}: target loss " + " ".join(f"{n} {v:.4f}" for n, v in r["target_loss"].items())
                      + "; off-target " + " ".join(f"{n} {v:.4f}" for n, v in r["offtarget_loss"].items())
                      + "; reference's target loss " + " ".join(f"{n} {v:.4f}" for n, v in
                                                                r["reference_target_loss"].items()))
                for name, shares in r["selected_share"].items():
                    print(f"  {name} keeps " + ", ".join(f"{n} {v:.0%}" for n, v in shares.items()))
                print("  seconds " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir(parser)
    parser.add_argument("--settings", nargs="+", default=["A", "B"], choices=["A", "B"])
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-tokens", type=int, default=1_200_000)
    parser.add_argument("--lever-settings", nargs="+", default=["A", "B"], choices=["A", "B"],
                        help="the settings --levers run in")
    parser.add_argument("--reference-tokens", type=int, default=2_400_000, help="3 passes over the clean math: a reference "
                        "clearly better on the target than the learners get (600k, under one pass, is not)")
    parser.add_argument("--reference-preset", help="a larger reference than the learner (setting A; default: the same)")
    parser.add_argument("--ratio", type=float, default=0.6, help="the ratio of SLM, random and the document filter")
    parser.add_argument("--base-tokens", type=int, default=1_200_000)
    parser.add_argument("--levers", nargs="*", default=["ratio=0.4", "ratio=0.8"],
                        help="extra SLM runs at the first seed, each key=value[,key=value] over "
                             f"{', '.join(LEVERS)} (lr also reruns CLM at that rate)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="bf16 on a GPU")
    parser.add_argument("--out", default="runs/bench-real")
    parser.add_argument("--result", default="result.json", help="file under OUT the results go to (runs already "
                        "finished under OUT are reused, so more levers can be added to an earlier benchmark)")
    parser.add_argument("--combine", nargs="+", metavar="RESULT_JSON",
                        help="only print the table of the runs in these result files (from separate invocations)")
    args = parser.parse_args()
    if args.combine:
        merged: dict[tuple, dict] = {}
        for f in args.combine:  # a run reused by a later invocation for more levers: one run, levers merged
            for r in json.loads(Path(f).read_text())["runs"]:
                key = (r["setting"], r["preset"], r["seed"])
                if key not in merged:
                    merged[key] = r
                    continue
                for field in ("efficiency", "reached", "target_loss", "offtarget_loss", "selected_share", "baseline"):
                    merged[key][field] = {**r.get(field, {}), **merged[key].get(field, {})}
        results = list(merged.values())
        table = report(results)
        Path(args.out, args.result).write_text(json.dumps({"combined": args.combine, "runs": results, "table": table},
                                                          indent=2, default=str))
        return
    data_dir = check_data_dir(args.data_dir)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    files, counts = build_corpora(data_dir, out / "data")
    stores = prepare_stores(files, out / "stores", args.vocab)
    print("corpora: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
          + f"; noisy tokens {stores['noisy'].n_tokens:,}", flush=True)
    results = []
    for preset in args.presets:
        for setting in args.settings:
            for i, seed in enumerate(args.seeds):
                r = run_setting(setting, preset, seed, stores, files, args, out / f"{setting}-{preset}-seed{seed}",
                                args.levers if i == 0 and setting in args.lever_settings else [])
                results.append(r)
                print(f"{setting}/{preset}/seed {seed}: " + ", ".join(
                    f"{m} {format_efficiency(e, r['reached'][m])}" for m, e in r["efficiency"].items()), flush=True)
                (out / args.result).write_text(json.dumps({"counts": counts, "args": vars(args) | {
                    "data_dir": str(data_dir)}, "runs": results}, indent=2, default=str))
    table = report(results)
    (out / args.result).write_text(json.dumps({"counts": counts, "args": vars(args) | {"data_dir": str(data_dir)},
                                                 "runs": results, "table": table}, indent=2, default=str))
    print(f"\n{out / args.result}", file=sys.stderr)


if __name__ == "__main__":
    main()
