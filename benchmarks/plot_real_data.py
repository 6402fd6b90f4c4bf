"""The README's real-data figure from real_data_efficiency.py's result.json files: token efficiency against
model size (median over seeds, min-max bars) and the first seed's target-loss curves.

    .venv/bin/python benchmarks/plot_real_data.py runs/bench-real-v2/result*.json --out docs/real_data.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from rho1.eval.curves import read_curve  # noqa: E402

TARGET = "eval/heldout/target_loss"
METHODS = {"slm": ("SLM 60%", "C1"), "document": ("document filter", "C2"), "random": ("random 60%", "C3")}
CURVES = {"clm": ("CLM", "C0"), **METHODS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="result files (or folders holding result.json)")
    parser.add_argument("--out", default="docs/real_data.png")
    args = parser.parse_args()
    files = [Path(f) / "result.json" if Path(f).is_dir() else Path(f) for f in args.results]
    seen, runs = set(), []
    for f in files:
        data = json.loads(f.read_text())
        for run in data.get("runs", []) if "combined" not in data else []:
            key = (run["setting"], run["preset"], run["seed"])
            if key not in seen:  # a run a later invocation reused for more levers appears twice
                seen.add(key)
                runs.append((f.parent, run))
    settings = sorted({r["setting"] for _, r in runs})
    fig, axes = plt.subplots(1, 1 + len(settings), figsize=(5 + 4.5 * len(settings), 3.8), dpi=110)
    ax = axes[0]
    for i, setting in enumerate(settings):
        for j, (method, (label, color)) in enumerate(METHODS.items()):
            points = {}
            for _, r in runs:
                if r["setting"] == setting and method in r["efficiency"]:
                    points.setdefault(r["parameters"], []).append(r["efficiency"][method])
            sizes = sorted(points)
            med = [statistics.median(points[s]) for s in sizes]
            err = [[m - min(points[s]) for m, s in zip(med, sizes)], [max(points[s]) - m for m, s in zip(med, sizes)]]
            shift = [s * (1 + 0.04 * (j - 1) + 0.015 * i) for s in sizes]
            ax.errorbar(shift, med, yerr=err, color=color, marker="os"[i], capsize=3, linestyle="-" if i == 0 else "--",
                        label=f"{label}, setting {setting}")
    ax.axhline(1.0, color="C0", lw=1, label="CLM")
    ax.set_xscale("log")
    sizes = sorted({r["parameters"] for _, r in runs})
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sizes, [f"{s / 1e6:.1f}M" for s in sizes])
    ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
    ax.set(xlabel="parameters", ylabel="token efficiency against CLM",
           title="median over seeds, min-max bars\n(a run that never reaches CLM counts as its bound, <= 1.00x)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax, setting in zip(axes[1:], settings):
        folder, run = next((f, r) for f, r in runs if r["setting"] == setting)
        name = f"{setting}-{run['preset']}-seed{run['seed']}"
        for method, (label, color) in CURVES.items():
            curve = read_curve(folder / name / method / "metrics.jsonl", TARGET)[1:]
            ax.plot([t / 1e6 for t, _ in curve], [v for _, v in curve], color=color, label=label)
        ax.set(xlabel="tokens trained on (millions)", ylabel="held-out GSM8K answer loss",
               title=f"setting {setting}, {run['preset']}, seed {run['seed']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
