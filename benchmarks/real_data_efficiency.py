"""Data efficiency on real data: CLM vs SLM vs random-60% at an equal token budget, several seeds, in one run.

    .venv/bin/python benchmarks/real_data_efficiency.py [--data-dir ../shared/data] [--seeds 0 1 2]
        [--train-tokens 500000] [--out runs/bench-real]

Corpora, all from --data-dir (default ../shared/data beside the project; never copied into the repository):
  reference  GSM8K train problems 0-3999 with their worked answers (clean, target domain);
  web        the noisy corpus to train on: GSM8K train problems 4000-7472, the four model-written solutions
             (right and wrong) of GSM8K test problems 0-999, and Tiny Shakespeare without its last 10%;
  heldout    GSM8K test problems 1000-1318 with their ground-truth answers: none of their model solutions
             is in the corpus. Target loss = loss on their answer tokens;
  offtarget  passages of the last 10% of Tiny Shakespeare.
The stages are those of `rho1 demo` (rho1.pipeline.compare): a base model on the web corpus, the reference
= base + clean GSM8K, then CLM, SLM and random-60% continue from the base on the same web tokens.
Prints the token efficiency of SLM and of the random control per seed and their medians, and 2-shot
greedy answer accuracy on the first 100 held-out problems.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

import transformers
from common import add_data_dir, check_data_dir

from rho1.eval.accuracy import QA_TEMPLATE
from rho1.experiments.demo import DemoConfig, compare

SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
QA = QA_TEMPLATE


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_corpora(data_dir: Path, out: Path, n_reference: int = 4000,
                  n_solved: int = 1000) -> tuple[dict[str, Path], dict]:
    train = _jsonl(data_dir / "gsm8k" / "train.jsonl")
    test = _jsonl(data_dir / "gsm8k" / "test.jsonl")
    solutions = _jsonl(data_dir / "gsm8k" / "example_model_solutions.jsonl")
    shakespeare = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(shakespeare) * 0.9)
    passages = lambda text: [text[i : i + 1500] for i in range(0, len(text), 1500)]  # noqa: E731

    web = [{"text": QA.format(**p)} for p in train[n_reference:]]
    n_right = n_wrong = 0
    for record in solutions[:n_solved]:
        for solver in SOLVERS:
            if solver in record:
                web.append({"text": QA.format(question=record["question"], answer=record[solver]["solution"])})
                n_right += bool(record[solver]["is_correct"])
                n_wrong += not record[solver]["is_correct"]
    web += [{"text": t} for t in passages(shakespeare[:cut])]
    random.Random(0).shuffle(web)  # documents of each kind spread over the store
    heldout_questions = {r["question"] for r in solutions[n_solved:]}
    heldout = [p for p in test if p["question"] in heldout_questions]
    files = {
        "reference": _write(out / "reference.jsonl", train[:n_reference]),
        "web": _write(out / "web.jsonl", web),
        "heldout": _write(out / "heldout.jsonl", heldout),
        "offtarget": _write(out / "offtarget.jsonl", [{"text": t} for t in passages(shakespeare[cut:])]),
    }
    counts = {"reference problems": n_reference, "web documents": len(web), "model solutions right": n_right,
              "model solutions wrong": n_wrong, "held-out problems": len(heldout)}
    return files, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-tokens", type=int, default=500_000)
    parser.add_argument("--out", default="runs/bench-real")
    add_data_dir(parser)
    args = parser.parse_args()
    data_dir = check_data_dir(args.data_dir)
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    files, counts = build_corpora(data_dir, out / "data")
    print("corpora: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()), flush=True)
    rows = []
    for seed in args.seeds:
        cfg = replace(DemoConfig(), out=str(out / f"seed{seed}"), seed=seed, train_tokens=args.train_tokens)
        s = compare(files, cfg, progress=False)
        rows.append(s)
        t = s["final_target_loss"]
        print(f"seed {seed}: SLM {s['token_efficiency']:.2f}x{'' if s['slm_reached_clm_loss'] else ' (never reached)'}"
              f", random {s['random_token_efficiency']:.2f}x{'' if s['random_reached_clm_loss'] else ' (never reached)'}"
              f"; target loss CLM {t['clm']:.4f} SLM {t['slm']:.4f} random {t['random']:.4f}; off-target loss "
              f"CLM {s['final_offtarget_loss']['clm']:.4f} SLM {s['final_offtarget_loss']['slm']:.4f}; answer accuracy "
              + " ".join(f"{k} {v:.1%}" for k, v in s["answer_accuracy"].items()), flush=True)
    median = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    print(f"median over {len(rows)} seeds: SLM token efficiency {median('token_efficiency'):.2f}x, "
          f"random-60% {median('random_token_efficiency'):.2f}x")
    (out / "result.json").write_text(json.dumps({"counts": counts, "runs": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
