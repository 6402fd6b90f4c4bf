"""SLM with a reference that has another tokenizer (`--cross-tokenizer`) against the same-tokenizer reference,
at one token budget, and what the projection costs in scoring throughput, side by side in one run.

    # a setting of real_data_efficiency.py (its reference corpus is FOLDER/../data/reference.jsonl)
    .venv/bin/python benchmarks/cross_tokenizer_efficiency.py runs/bench-real-v2/A-small-seed0 --vocab 8192
    # the demo (run `rho1 demo --out runs/demo` first)
    .venv/bin/python benchmarks/cross_tokenizer_efficiency.py runs/demo --reference-data runs/demo/data/reference.jsonl

FOLDER holds the comparison's clm/, slm/ and reference/ runs. A BPE of another vocabulary is trained on the
reference corpus, a reference of the same size and budget as FOLDER/reference is trained with it from
scratch (the demo's reference continues the base, which another tokenizer cannot), the training store is
scored with it through the projection, and SLM is trained on those scores with the slm/ run's config.
Scoring throughput: the same-tokenizer reference scored directly, and the other one through the
projection, interleaved. Writes FOLDER/cross_tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import transformers

from rho1.config import TrainConfig, config_from_dict, load_yaml
from rho1.data.prepare import PrepareConfig, prepare
from rho1.eval.accuracy import QA_TEMPLATE
from rho1.eval.curves import format_efficiency, read_curve, target_key, token_efficiency
from rho1.score import ScoreConfig, score
from rho1.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--reference-data", help="clean jsonl (question, answer); default FOLDER/../data/reference.jsonl")
    parser.add_argument("--vocab", type=int, default=8192, help="the other tokenizer's vocabulary")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=2, help="scoring passes of each reference (interleaved)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    folder = Path(args.folder)
    work = folder / "cross-tokenizer"
    slm = config_from_dict(TrainConfig, load_yaml(str(folder / "slm" / "config.yaml")), str(folder))
    ref_cfg = config_from_dict(TrainConfig, load_yaml(str(folder / "reference" / "config.yaml")), str(folder))
    data = Path(args.reference_data or folder.parent / "data" / "reference.jsonl")
    times = {}
    start = time.time()
    store = prepare(PrepareConfig([str(data)], str(work / "reference-store"), train_tokenizer=args.vocab,
                                  template=QA_TEMPLATE, target_field="answer", overwrite=True), progress=False)
    if not (work / "reference" / "summary.json").is_file():
        shutil.rmtree(work / "reference", ignore_errors=True)
        train(replace(ref_cfg, data=str(store.path), out=str(work / "reference"), model=None, eval_data=[],
                      eval_scores=[], threads=args.threads or ref_cfg.threads), progress=False)
    times["other tokenizer: prepare + reference"] = round(time.time() - start, 1)

    def scored(model: str, cross: bool, out: Path, eval_store: str | None = None) -> tuple:
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        s = score(ScoreConfig(eval_store or slm.data, model, str(out), slm.seq_len, cross_tokenizer=cross,
                              threads=args.threads), progress=False)
        return s, time.time() - t

    seconds = {"same tokenizer (direct)": [], "other tokenizer (projected)": []}
    for r in range(args.repeats):  # interleaved, so both see the same machine
        _, t = scored(str(folder / "reference" / "final"), False, work / f"timing-same-{r}")
        seconds["same tokenizer (direct)"].append(t)
        cross_scores, t = scored(str(work / "reference" / "final"), True, work / "scores")
        seconds["other tokenizer (projected)"].append(t)
    n_tokens = cross_scores.manifest["n_tokens"]
    heldout = next(p for p in slm.eval_data)
    heldout_scores, _ = scored(str(work / "reference" / "final"), True, work / "scores-heldout", heldout)
    run = work / "slm"
    if not (run / "summary.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        train(replace(slm, out=str(run), scores=str(cross_scores.path),
                      eval_scores=[str(heldout_scores.path), *slm.eval_scores[1:]], threads=args.threads or slm.threads),
              progress=False)
    key = target_key(json.loads((folder / "clm" / "summary.json").read_text()))
    clm = read_curve(folder / "clm" / "metrics.jsonl", key)
    from rho1.data.store import TokenStore

    result = {"folder": str(folder), "vocab": {"learner": TokenStore.open(slm.data).vocab_size, "other": args.vocab},
              "scoring_tokens_per_second": {k: n_tokens / min(v) for k, v in seconds.items()},
              "seconds": times, "target_loss": {"clm": clm[-1][1]}, "efficiency": {}, "reached": {}}
    for name, path in (("slm, same-tokenizer reference", folder / "slm"), ("slm, other-tokenizer reference", run)):
        curve = read_curve(path / "metrics.jsonl", key)
        result["efficiency"][name], result["reached"][name] = token_efficiency(clm, curve)
        result["target_loss"][name] = curve[-1][1]
        print(f"{name:<32} {format_efficiency(result['efficiency'][name], result['reached'][name]):>26}  "
              f"target loss {curve[-1][1]:.4f} (CLM {clm[-1][1]:.4f})")
    ratio = result["scoring_tokens_per_second"]["other tokenizer (projected)"] / \
        result["scoring_tokens_per_second"]["same tokenizer (direct)"]
    print("scoring: " + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in result["scoring_tokens_per_second"].items())
          + f"; projected / direct = {ratio:.2f}x")
    (folder / "cross_tokenizer.json").write_text(json.dumps(result, indent=2))
    print(folder / "cross_tokenizer.json")


if __name__ == "__main__":
    main()
