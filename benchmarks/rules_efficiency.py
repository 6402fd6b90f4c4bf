"""Selection rules side by side at one token budget: topk (the paper's), soft at two temperatures, threshold
at two thresholds, and the static selection of `rho1 export` trained on by a plain transformers.Trainer,
each against CLM on the same data, starting model and order.

    # the demo data (each seed first runs `rho1 demo`'s stages into OUT/seed-N)
    .venv/bin/python benchmarks/rules_efficiency.py --demo --seeds 0 1 2 --out runs/bench-rules
    # any folders holding clm/ and slm/ runs of rho1 train, e.g. a setting of real_data_efficiency.py
    .venv/bin/python benchmarks/rules_efficiency.py --runs runs/bench-real-v2/A-small-seed0

Every variant is the slm/ run's config with one change, trained into FOLDER/rule-*/ (finished ones are
reused). Prints token efficiency against CLM and final target loss per folder and the median over them,
and writes OUT/rules.json (or FOLDER/rules.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import transformers
from static_selection import static_run

from rho1.config import TrainConfig, config_from_dict, load_yaml
from rho1.eval.curves import format_efficiency, read_curve, target_key, token_efficiency
from rho1.model import build_model
from rho1.train import train

VARIANTS = {"topk": {}, "soft-0.1": dict(rule="soft", temperature=0.1), "soft-0.5": dict(rule="soft", temperature=0.5),
            "threshold-0": dict(rule="threshold", threshold=0.0), "threshold-0.5": dict(rule="threshold", threshold=0.5),
            "static": dict(ratio=None), "static-1.0": dict(ratio=1.0)}  # static-1.0: the Trainer with every label


def start_model(cfg: TrainConfig, folder: Path) -> str:
    """The model the runs start from: --model, or the fresh model rho1 train builds from the preset and seed."""
    if cfg.model:
        return cfg.model
    from rho1.data.store import TokenStore

    path = folder / "initial"
    if not (path / "config.json").is_file():
        store = TokenStore.open(cfg.data)
        tokenizer = store.tokenizer()
        build_model(cfg.model_preset, store.vocab_size, max(cfg.seq_len, 2048), store.manifest["eos_token_id"],
                    tokenizer.pad_token_id, seed=cfg.seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def compare(folder: Path, threads: int | None = None, variants: list[str] | None = None) -> dict:
    slm = config_from_dict(TrainConfig, load_yaml(str(folder / "slm" / "config.yaml")), str(folder))
    slm = replace(slm, threads=threads or slm.threads)
    key = target_key(json.loads((folder / "clm" / "summary.json").read_text()))
    clm = read_curve(folder / "clm" / "metrics.jsonl", key)
    result = {"folder": str(folder), "target": key, "tokens": slm.max_tokens, "efficiency": {}, "reached": {},
              "target_loss": {"clm": clm[-1][1]}, "seconds": {}}
    for name, change in VARIANTS.items():
        if variants and name not in variants:
            continue
        out = folder / ("slm" if name == "topk" else f"rule-{name}")
        start = time.time()
        if name.startswith("static"):  # rho1 export + a plain transformers.Trainer (static-1.0: CLM that way)
            static_run(replace(slm, ratio=change["ratio"] or slm.ratio), start_model(slm, folder), slm.scores, out)
        elif not (out / "summary.json").is_file():
            train(replace(slm, out=str(out), **change), progress=False)
        result["seconds"][name] = round(time.time() - start, 1)
        curve = read_curve(out / "metrics.jsonl", key)
        result["efficiency"][name], result["reached"][name] = token_efficiency(clm, curve)
        result["target_loss"][name] = curve[-1][1]
        print(f"  {folder.name} {name:<14} {format_efficiency(result['efficiency'][name], result['reached'][name]):>28}"
              f"  target loss {curve[-1][1]:.4f} (CLM {clm[-1][1]:.4f})", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[], help="folders holding clm/ and slm/ runs")
    parser.add_argument("--demo", action="store_true", help="run the demo's stages first, one folder per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--out", default="runs/bench-rules")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="only these (default: all)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    folders = [Path(f) for f in args.runs]
    if args.demo:
        from rho1.config import DEMO_PRESETS as PRESETS
        from rho1.experiments.demo import run_demo

        for seed in args.seeds:
            folder = Path(args.out) / f"seed-{seed}"
            if not (folder / "summary.json").is_file():
                run_demo(replace(PRESETS[args.preset], seed=seed, out=str(folder)), progress=False)
            folders.append(folder)
    if not folders:
        parser.error("pass --runs FOLDER ... or --demo")
    results = [compare(f, args.threads, args.variants) for f in folders]
    print("\nmedian over " + ", ".join(f.name for f in folders) + ":")
    for name in [n for n in VARIANTS if all(n in r["efficiency"] for r in results)]:
        values = [r["efficiency"][name] for r in results]
        print(f"  {name:<14} {statistics.median(values):.2f}x  (min {min(values):.2f}x, max {max(values):.2f}x)"
              f"  reached CLM's loss in {sum(r['reached'][name] for r in results)} of {len(results)}")
    name = "rules.json" if not args.variants else f"rules-{'-'.join(args.variants)}.json"
    path = Path(args.out) / name if args.demo or len(folders) > 1 else folders[0] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(path)


if __name__ == "__main__":
    main()
