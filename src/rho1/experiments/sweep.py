"""`rho1 sweep`: SLM at several selection ratios, with each score function and each selection rule, on the
same data, starting model and token budget, then a table and the target loss against the ratio (Rho-1 Fig. 9).

Every run is an ordinary `rho1 train` run under OUT/ (``ratio-0.6``, ``score-random``, ``rule-soft`` ...), so a sweep
killed halfway skips the runs that finished when started again, and `rho1 report OUT/*` compares them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from markupsafe import escape

from rho1.analysis.html import render_page
from rho1.analysis.plots import figure, to_data_uri
from rho1.config import SweepConfig
from rho1.data.store import check_writable, read_json
from rho1.data.tokenizer import load_tokenizer
from rho1.eval.accuracy import AnswerConfig, answer_accuracy
from rho1.eval.curves import target_key
from rho1.lock import write_lock
from rho1.model import load_model
from rho1.train import TrainConfig, checkpoints, train


def plan(cfg: SweepConfig) -> dict[str, TrainConfig]:
    """Run name -> its training config: the excess-loss top-k runs at each ratio (and at the ablation ratio,
    so each other score function and rule has one to compare with), then the other score functions and rules."""
    cfg.check()
    ablations = [s for s in cfg.score_functions if s != "excess"]
    rules = [r for r in cfg.rules if r != "topk"]
    runs = {}
    for r in sorted(set(cfg.ratios) | ({cfg.ablation_ratio} if ablations or rules else set())):
        objective = "clm" if r == 1.0 else "slm"
        runs["clm" if r == 1.0 else f"ratio-{r:g}"] = replace(cfg.train, objective=objective, ratio=r, score="excess",
                                                             rule="topk")
    for s in ablations:
        runs[f"score-{s}"] = replace(cfg.train, objective="slm", ratio=cfg.ablation_ratio, score=s, rule="topk")
    for r in rules:
        runs[f"rule-{r}"] = replace(cfg.train, objective="slm", ratio=cfg.ablation_ratio, score="excess", rule=r)
    return {name: replace(c, out=str(Path(cfg.out) / name)) for name, c in runs.items()}


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio_plot(results: dict, key: str, title: str, path: Path) -> str:
    """``key`` against the ratio: a line for the excess-loss runs, a cross per other score function."""
    fig, ax = figure()
    curve = sorted((r["ratio"], r.get(key)) for r in results.values() if r["score"] == "excess" and r["rule"] == "topk")
    ax.plot(*zip(*curve), marker="o", label="excess loss (SLM)")
    for r in results.values():
        if r["score"] != "excess" or r["rule"] != "topk":
            ax.scatter([r["ratio"]], [r.get(key)], marker="x", s=60,
                       label=r["score"] if r["rule"] == "topk" else f"rule {r['rule']}")
    ax.set(xlabel="selection ratio", ylabel=key, title=title)
    ax.legend()
    return to_data_uri(fig, path)


def sweep(cfg: SweepConfig, progress: bool = True) -> dict:
    """Train every planned run (resuming any a kill left halfway), then the table and the plot; one sweep
    writes --out at a time."""
    out = Path(cfg.out)
    check_writable(out)
    with write_lock(out, "rho1 sweep"):
        return _sweep(cfg, out, progress)


def _sweep(cfg: SweepConfig, out: Path, progress: bool) -> dict:
    runs = plan(cfg)
    results = {}
    for name, train_cfg in runs.items():
        done = Path(train_cfg.out) / "summary.json"
        if done.is_file():
            summary = read_json(done, f"delete it to train {name} again")
            if progress:
                print(f"sweep: {name} already done")
        else:
            if progress:
                print(f"sweep: {name} ({train_cfg.objective}, ratio {train_cfg.ratio}, score {train_cfg.score}, "
                      f"rule {train_cfg.rule})")
            if checkpoints(Path(train_cfg.out)):  # killed halfway: continue from its last checkpoint
                train_cfg = replace(train_cfg, resume=True)
            else:
                shutil.rmtree(train_cfg.out, ignore_errors=True)
            summary = train(train_cfg, progress)
        if cfg.answers and summary.get("answer_accuracy") is None:  # also for a run finished by an earlier sweep
            final = Path(train_cfg.out) / "final"
            acc = answer_accuracy(load_model(str(final)), load_tokenizer(final),
                                  AnswerConfig(cfg.answers, cfg.shots, limit=cfg.answers_limit, max_new_tokens=128,
                                               out=str(Path(train_cfg.out) / "answers.jsonl")), progress=False)
            summary["answer_accuracy"] = acc["accuracy"]
            done.write_text(json.dumps(summary, indent=2))
        results[name] = {"ratio": train_cfg.ratio, "score": train_cfg.score, "rule": train_cfg.rule, **summary}
    target = cfg.target or target_key(next(iter(results.values())))
    table = [(name, r["ratio"], r["score"], r["rule"], r.get(target), r.get("answer_accuracy"))
             for name, r in results.items()]
    uris = [_ratio_plot(results, target, "Target loss against the selection ratio", out / "sweep.png")]
    if cfg.answers:
        uris.append(_ratio_plot(results, "answer_accuracy", f"{cfg.shots}-shot answer accuracy against the ratio",
                                out / "sweep_accuracy.png"))
    acc_head = "<th>answer accuracy</th>" if cfg.answers else ""
    rows = "".join(f"<tr><td>{escape(n)}</td><td>{ra:g}</td><td>{escape(s)}</td><td>{escape(ru)}</td>"
                   f"<td>{_num(v, '.4f')}</td>" + (f"<td>{_num(a, '.1%')}</td>" if cfg.answers else "") + "</tr>"
                   for n, ra, s, ru, v, a in table)
    figures = "".join(f'<figure><img src="{u}" alt="sweep"></figure>' for u in uris)
    (out / "sweep.html").write_text(render_page(
        "rho1 sweep", f"<table><tr><th>run</th><th>ratio</th><th>score</th><th>rule</th><th>{escape(target)}</th>"
        f"{acc_head}</tr>"
        f"{rows}</table>{figures}"))
    (out / "sweep.json").write_text(json.dumps({"target": target, "runs": results}, indent=2))
    if progress:
        print(f"\nrho1 sweep: {target} after {next(iter(results.values()))['tokens']:,} tokens per run")
        for name, ratio, score, rule, value, acc in table:
            print(f"  {name:<16} ratio {ratio:<4g} {score:<10} {rule:<10} {_num(value, '.4f')}"
                  + (f"  accuracy {acc:.1%}" if acc is not None else ""))
        print(f"table and plot: {out / 'sweep.html'}")
    return {"target": target, "runs": results}
