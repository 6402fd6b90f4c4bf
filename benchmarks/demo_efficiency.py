"""Token efficiency of SLM over CLM on the embedded demo data, over several seeds, in one run.

    .venv/bin/python benchmarks/demo_efficiency.py --seeds 0 1 2 [--ratio 0.6] [--out runs/bench-efficiency]

Each seed regenerates the demo corpora, trains its own reference model, scores, and trains CLM, SLM and
the random-selection control on the same tokens in the same order. Prints each seed and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import transformers

from rho1.config import DEMO_PRESETS as PRESETS
from rho1.experiments.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--out", default="runs/bench-efficiency")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()

    rows = []
    for seed in args.seeds:
        start = time.time()
        cfg = replace(PRESETS[args.preset], seed=seed, ratio=args.ratio, out=f"{args.out}/seed-{seed}")
        s = run_demo(cfg, progress=False)
        rows.append(s)
        print(f"seed {seed}: SLM {s['token_efficiency']:.2f}x{'' if s['slm_reached_clm_loss'] else ' (bound)'}, "
              f"random {s['random_token_efficiency']:.2f}x{'' if s['random_reached_clm_loss'] else ' (bound)'}; "
              f"target loss CLM {s['final_target_loss']['clm']:.4f} SLM {s['final_target_loss']['slm']:.4f} "
              f"random {s['final_target_loss']['random']:.4f}; off-target loss CLM "
              f"{s['final_offtarget_loss']['clm']:.4f} SLM {s['final_offtarget_loss']['slm']:.4f}; "
              f"{time.time() - start:.0f}s", flush=True)

    def med(f):
        return statistics.median(f(r) for r in rows)

    result = {
        "seeds": args.seeds,
        "ratio": args.ratio,
        "median_token_efficiency": med(lambda r: r["token_efficiency"]),
        "median_random_token_efficiency": med(lambda r: r["random_token_efficiency"]),
        "median_target_loss": {k: med(lambda r: r["final_target_loss"][k]) for k in ("clm", "slm", "random")},
        "median_offtarget_loss": {k: med(lambda r: r["final_offtarget_loss"][k]) for k in ("clm", "slm", "random")},
        "median_tokens_per_second": {k: med(lambda r: r["tokens_per_second"][k]) for k in rows[0]["tokens_per_second"]},
        "median_stage_seconds": {k: med(lambda r: r["stage_seconds"][k]) for k in rows[0]["stage_seconds"]},
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2))
    print(f"\nmedian over seeds {args.seeds}: SLM token efficiency {result['median_token_efficiency']:.2f}x, "
          f"random-{args.ratio:.0%} control {result['median_random_token_efficiency']:.2f}x")
    print("median target loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result["median_target_loss"].items()))
    print("median off-target loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result["median_offtarget_loss"].items()))
    print("median tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["median_tokens_per_second"].items()))


if __name__ == "__main__":
    main()
