"""`rho1 demo`: every stage end to end on the embedded demo data, then the CLM vs SLM table.

As in the paper's main experiments, a base model comes first (here: a short CLM pretraining on the web
corpus); the reference model is the base trained further on the clean math, and CLM, SLM and the
random control all continue from the base on the same web tokens in the same order.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from rho1.accuracy import AnswerConfig, answer_accuracy
from rho1.analysis.dynamics import DynamicsConfig, compute_dynamics
from rho1.analysis.report import ReportConfig, report
from rho1.analysis.viewer import ViewConfig, build_view, run_checkpoint_columns
from rho1.config import DemoConfig
from rho1.data import demo as demo_data
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import check_writable
from rho1.data.tokenizer import load_tokenizer
from rho1.evaluate import read_curve, token_efficiency
from rho1.model import load_model
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

MATH_TEMPLATE = "Question: {question}\nAnswer: {answer}"


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Generate the demo corpora, then ``compare`` CLM, SLM and the random control on them."""
    cfg.check()
    check_writable(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.time()
    files = demo_data.generate(Path(cfg.out) / "data", cfg.seed, cfg.n_reference, cfg.n_web, cfg.n_heldout,
                               cfg.n_offtarget, cfg.math_share, cfg.wrong_share)
    return compare(files, cfg, progress, {"data": round(time.time() - start, 2)})


def compare(files: dict[str, Path], cfg: DemoConfig, progress: bool = True, seconds: dict | None = None) -> dict:
    """Every stage on four files: ``web`` (jsonl, ``text``: the corpus to train on), ``reference`` and
    ``heldout`` (jsonl, ``question``/``answer``: clean target-domain data and its held-out test), and
    ``offtarget`` (jsonl, ``text``: held-out text outside the target domain). Writes summary.json."""
    out = Path(cfg.out)
    seconds = dict(seconds or {})
    for stale in ("stores", "base", "reference", "scores", "clm", "slm", "random"):  # a demo starts over
        shutil.rmtree(out / stale, ignore_errors=True)

    def stage(name):
        if progress:
            print(f"\n== {name} ==")
        seconds[name] = time.time()

    def done(name):
        seconds[name] = round(time.time() - seconds[name], 2)

    stage("prepare")
    stores = out / "stores"
    corpus = prepare(PrepareConfig([str(files["web"])], str(stores / "web"), train_tokenizer=cfg.vocab_size,
                                   text_field="text"), progress)
    math_kw = dict(tokenizer=str(corpus.path), template=MATH_TEMPLATE, target_field="answer")
    reference = prepare(PrepareConfig([str(files["reference"])], str(stores / "reference"), **math_kw), progress)
    heldout = prepare(PrepareConfig([str(files["heldout"])], str(stores / "heldout"), **math_kw), progress)
    offtarget = prepare(PrepareConfig([str(files["offtarget"])], str(stores / "offtarget"),
                                      tokenizer=str(corpus.path), text_field="text"), progress)
    done("prepare")

    common = TrainConfig(model_preset=cfg.model_preset, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.lr,
                       seed=cfg.seed, ratio=cfg.ratio, log_every=5)
    step_tokens = cfg.batch_size * cfg.seq_len

    if cfg.base_tokens:
        # As in the paper's main experiments: the reference and the trained models share a base model.
        stage("base")
        train(replace(common, data=str(corpus.path), out=str(out / "base"), max_tokens=cfg.base_tokens,
                      seed=cfg.seed + 1), progress)  # another data order than the runs that continue from it
        done("base")
        common = replace(common, model=str(out / "base" / "final"))

    stage("reference")
    ref_run = out / "reference"
    train(replace(common, data=str(reference.path), out=str(ref_run), max_tokens=cfg.reference_tokens,
                  eval_data=[str(heldout.path)]), progress)
    done("reference")

    stage("score")
    ref_model = str(ref_run / "final")
    corpus_scores = score(ScoreConfig(str(corpus.path), ref_model, str(out / "scores" / "web"), cfg.seq_len), progress)
    heldout_scores = score(ScoreConfig(str(heldout.path), ref_model, str(out / "scores" / "heldout"), cfg.seq_len),
                           progress)
    done("score")

    eval_every = max(step_tokens, (cfg.train_tokens // cfg.eval_points) // step_tokens * step_tokens)
    save_every = max(step_tokens, (cfg.train_tokens // 6) // step_tokens * step_tokens)  # checkpoints for dynamics
    runs = {"clm": dict(objective="clm"), "slm": dict(objective="slm", score="excess"),
            "random": dict(objective="slm", score="random")}
    summaries = {}
    for name, overrides in runs.items():
        stage(f"train {name}")
        summaries[name] = train(replace(common, data=str(corpus.path), out=str(out / name), scores=str(corpus_scores.path),
                                        max_tokens=cfg.train_tokens, eval_every=eval_every,
                                        eval_data=[str(heldout.path), str(offtarget.path)],
                                        eval_scores=[str(heldout_scores.path), ""], save_every=save_every,
                                        keep_last=0, **overrides), progress)
        done(f"train {name}")

    accuracy = {}
    if cfg.accuracy_problems:
        stage("accuracy")
        answers = AnswerConfig(str(files["heldout"]), shots=2, exemplars=str(files["reference"]),
                               limit=cfg.accuracy_problems, max_new_tokens=96, batch_size=32)
        for name in runs:
            final = out / name / "final"
            accuracy[name] = answer_accuracy(load_model(str(final)), load_tokenizer(final),
                                             replace(answers, out=str(out / name / "answers.jsonl")), progress=False)
        done("accuracy")

    target_key, off_key = "eval/heldout/target_loss", "eval/offtarget/loss"
    curves = {name: read_curve(out / name / "metrics.jsonl", target_key) for name in runs}
    slm_eff, slm_reached = token_efficiency(curves["clm"], curves["slm"])
    rnd_eff, rnd_reached = token_efficiency(curves["clm"], curves["random"])
    summary = {
        "seed": cfg.seed,
        "tokens_trained": summaries["clm"]["tokens"],
        "ratio": cfg.ratio,
        "token_efficiency": slm_eff,
        "slm_reached_clm_loss": slm_reached,
        "random_token_efficiency": rnd_eff,
        "random_reached_clm_loss": rnd_reached,
        "final_target_loss": {name: s[target_key] for name, s in summaries.items()},
        "final_offtarget_loss": {name: s[off_key] for name, s in summaries.items()},
        "answer_accuracy": {name: a["accuracy"] for name, a in accuracy.items()},
        "gold_solution_loss": {name: a["gold_loss"] for name, a in accuracy.items()},
        "final_heldout_selected_loss": {name: s.get("eval/heldout/selected_loss") for name, s in summaries.items()},
        "final_heldout_unselected_loss": {name: s.get("eval/heldout/unselected_loss") for name, s in summaries.items()},
        "tokens_per_second": {"prepare": corpus.manifest["n_tokens"] / max(corpus.manifest["seconds"], 1e-9),
                              "score": corpus_scores.manifest["tokens_per_second"],
                              **{f"train {n}": s["tokens_per_second"] for n, s in summaries.items()}},
        "stage_seconds": seconds,
        "config": cfg.__dict__,
    }
    stage("report")
    summary["report"] = write_report(out, heldout.path, corpus.path, corpus_scores.path, cfg, progress)
    done("report")
    summary["stage_seconds"] = seconds
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if progress:
        print_table(summary, out)
    return summary


def write_report(out: Path, heldout: Path, corpus: Path, corpus_scores: Path, cfg: DemoConfig,
                 progress: bool = True) -> str:
    """Token dynamics of the CLM and SLM runs on the held-out problems, a viewer excerpt of the web corpus,
    and the HTML report of the three runs."""
    for name in ("clm", "slm"):
        compute_dynamics(DynamicsConfig(run=str(out / name), data=str(heldout), max_windows=64), progress=False)
    common = dict(data=str(corpus), scores=str(corpus_scores), ratio=cfg.ratio, seq_len=cfg.seq_len, windows=1)
    start_model = str(out / "base" / "final") if cfg.base_tokens else run_checkpoint_columns(str(out / "slm"))[0]
    selection, _ = build_view(ViewConfig(model=[start_model], **common))
    tendency, _ = build_view(ViewConfig(model=run_checkpoint_columns(str(out / "slm")), **common))
    viewer = (f"<h3>Tokens SLM trains on at its first step (top {cfg.ratio:.0%} by excess loss)</h3>{selection}"
              f"<h3>Selection tendency over the SLM run (checkpoints at 0/33/66/100%)</h3>{tendency}")
    result = report(ReportConfig(runs=[str(out / n) for n in ("clm", "slm", "random")], out=str(out / "report.html"),
                                 target="eval/heldout/target_loss"), viewer, progress=False)
    if progress:
        print(f"report: {Path(result['path']).resolve()}")
    return result["path"]


def _fmt_eff(value: float, reached: bool) -> str:
    return f"{value:.2f}x" if reached else f"< {value:.2f}x (never reached CLM's loss)"


def print_table(summary: dict, out: Path) -> None:
    acc = summary.get("answer_accuracy") or {}
    fmt_acc = lambda name: f"{acc[name]:.0%}" if name in acc else "-"  # noqa: E731
    rows = [("run", "target loss", "off-target loss", "answer accuracy", "token efficiency")]
    rows.append(("CLM (all tokens)", summary["final_target_loss"]["clm"], summary["final_offtarget_loss"]["clm"],
                 fmt_acc("clm"), "1.00x"))
    rows.append((f"SLM (top {summary['ratio']:.0%} by excess loss)", summary["final_target_loss"]["slm"],
                 summary["final_offtarget_loss"]["slm"], fmt_acc("slm"),
                 _fmt_eff(summary["token_efficiency"], summary["slm_reached_clm_loss"])))
    rows.append((f"random {summary['ratio']:.0%} (control)", summary["final_target_loss"]["random"],
                 summary["final_offtarget_loss"]["random"], fmt_acc("random"),
                 _fmt_eff(summary["random_token_efficiency"], summary["random_reached_clm_loss"])))
    print(f"\nrho1 demo: {summary['tokens_trained']:,} tokens per run; target = loss on held-out answer tokens; "
          f"accuracy = 2-shot greedy exact match on {summary['config']['accuracy_problems']} held-out problems")
    widths = [max(len(r[i] if isinstance(r[i], str) else f"{r[i]:.4f}") for r in rows) for i in range(5)]
    for r in rows:
        cells = [c if isinstance(c, str) else f"{c:.4f}" for c in r]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    stage_s = ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items())
    print("\ntoken efficiency = tokens CLM needs to reach its final target loss / tokens the run needs to reach it")
    print(f"stages: {stage_s} (total {sum(summary['stage_seconds'].values()):.0f}s)")
    if not math.isnan(summary["token_efficiency"]) and summary["token_efficiency"] < 1.0:
        print("SLM did not beat CLM on this run: the table reports it as measured.")
    print(f"summary: {out / 'summary.json'}")
    print(f"report (open in a browser): {Path(summary['report']).resolve()}")
