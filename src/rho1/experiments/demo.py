"""`rho1 demo`: every stage end to end on the embedded demo data, then the CLM vs SLM table.

As in the paper's main experiments, a base model comes first (here: a short CLM pretraining on the web
corpus); the reference model is the base trained further on the clean math, and CLM, SLM and the
random control all continue from the base on the same web tokens in the same order.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from rho1.analysis.dynamics import DynamicsConfig, compute_dynamics
from rho1.analysis.report import ReportConfig, report
from rho1.analysis.viewer import ViewConfig, build_view, run_checkpoint_columns
from rho1.compute import compute_efficiency
from rho1.config import DemoConfig
from rho1.data.store import check_writable
from rho1.data.tokenizer import load_tokenizer
from rho1.eval.accuracy import QA_TEMPLATE, AnswerConfig, answer_accuracy
from rho1.eval.curves import format_efficiency, read_curve, token_efficiency
from rho1.experiments import demo_data
from rho1.experiments.pipeline import Recipe, print_cost, run_stages, study_cost
from rho1.lock import write_lock
from rho1.model import load_model
from rho1.threads import set_threads

MATH_TEMPLATE = QA_TEMPLATE
RUNS = {"clm": dict(objective="clm"), "slm": dict(objective="slm", score="excess"),
        "random": dict(objective="slm", score="random")}


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Generate the demo corpora, then ``compare`` CLM, SLM and the random control on them."""
    cfg.check()
    check_writable(cfg.out)
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    with write_lock(cfg.out, "rho1 demo"):  # one demo writes --out at a time (its stages lock their own folders)
        start = time.time()
        files = demo_data.generate(Path(cfg.out) / "data", cfg.seed, cfg.n_reference, cfg.n_web, cfg.n_heldout,
                                   cfg.n_offtarget, cfg.math_share, cfg.wrong_share)
        return compare(files, cfg, progress, {"data": round(time.time() - start, 2)})


class StageTimer:
    """``with timer("score"):`` prints the stage's name and keeps its seconds."""

    def __init__(self, progress: bool, seconds: dict | None = None):
        self.progress, self.seconds = progress, dict(seconds or {})

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.progress:
            print(f"\n== {name} ==")
        start = time.time()
        yield
        self.seconds[name] = round(time.time() - start, 2)


def _accuracy(files: dict[str, Path], cfg: DemoConfig, out: Path) -> dict:
    answers = AnswerConfig(str(files["heldout"]), shots=2, exemplars=str(files["reference"]),
                           limit=cfg.accuracy_problems, max_new_tokens=96, batch_size=32)
    return {name: answer_accuracy(load_model(str(out / name / "final")), load_tokenizer(out / name / "final"),
                                  replace(answers, out=str(out / name / "answers.jsonl")), progress=False)
            for name in RUNS}


def demo_recipe(files: dict[str, Path], cfg: DemoConfig) -> Recipe:
    """The demo as a `rho1 pipeline` recipe: a preset and its BPE, a base pretrained on the web corpus, the reference
    trained on the clean math, CLM, SLM and random on the web pages, measured on the held-out problems."""
    step_tokens = cfg.batch_size * cfg.seq_len
    save_every = max(step_tokens, (cfg.train_tokens // 6) // step_tokens * step_tokens)  # checkpoints for dynamics
    return Recipe(model=cfg.model_preset, corpus=[str(files["web"])], reference_data=[str(files["reference"])],
                  target=[str(files["heldout"])], offtarget=[str(files["offtarget"])], tokens=cfg.train_tokens,
                  ratio=cfg.ratio, baselines=["clm", "random"], reference_tokens=cfg.reference_tokens,
                  base_tokens=cfg.base_tokens, vocab_size=cfg.vocab_size, seed=cfg.seed, eval_points=cfg.eval_points,
                  out=cfg.out, train={"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "lr": cfg.lr,
                                      "warmup_steps": 20, "log_every": 5, "save_every": save_every, "keep_last": 0})


def compare(files: dict[str, Path], cfg: DemoConfig, progress: bool = True, seconds: dict | None = None) -> dict:
    """Every stage on four files: ``web`` (jsonl, ``text``: the corpus to train on), ``reference`` and
    ``heldout`` (jsonl, ``question``/``answer``: clean target-domain data and its held-out test), and
    ``offtarget`` (jsonl, ``text``: held-out text outside the target domain), run as a `rho1 pipeline` recipe;
    then the answer accuracy, the token dynamics and the report. Writes summary.json."""
    out = Path(cfg.out)
    timer = StageTimer(progress, seconds)
    study = run_stages(demo_recipe(files, cfg), progress)
    for stage, took in study.stages.seconds.items():  # prepare corpus, prepare target ... as one "prepare"
        name = stage if stage.startswith("train ") else stage.split(" ")[0]
        timer.seconds[name] = round(timer.seconds.get(name, 0.0) + took, 2)
    accuracy = {}
    if cfg.accuracy_problems:
        with timer("accuracy"):
            accuracy = _accuracy(files, cfg, out)
    summary = _summary(cfg, out, study.stores, study.scores, study.runs, accuracy)
    summary["cost"] = study_cost(out, TARGET, study.runs, study.scores, trained_reference=True)
    random_vs_clm = compute_efficiency(read_curve(out / "clm" / "metrics.jsonl", TARGET, x="flops"),
                                       read_curve(out / "random" / "metrics.jsonl", TARGET, x="flops"), 0.0)
    summary["compute_efficiency"] = summary["cost"]["efficiency"]["clm"]["compute_efficiency"]
    summary["slm_reached_clm_loss_compute"] = summary["cost"]["efficiency"]["clm"]["reached"]
    summary["random_compute_efficiency"], summary["random_reached_clm_loss_compute"] = random_vs_clm[:2]
    with timer("report"):
        summary["report"] = write_report(out, study.stores["target"].path, study.stores["corpus"].path,
                                         study.scores["corpus"].path, cfg, progress, summary["cost"])
    summary["stage_seconds"] = timer.seconds
    summary["threads"] = torch.get_num_threads()  # the numbers depend on it: --threads N reproduces them
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if progress:
        print_table(summary, out)
    return summary


TARGET = "eval/target/target_loss"


def _summary(cfg: DemoConfig, out: Path, stores: dict, scores: dict, summaries: dict, accuracy: dict) -> dict:
    target_key, off_key = TARGET, "eval/offtarget/loss"
    curves = {name: read_curve(out / name / "metrics.jsonl", target_key) for name in RUNS}
    slm_eff, slm_reached = token_efficiency(curves["clm"], curves["slm"])
    rnd_eff, rnd_reached = token_efficiency(curves["clm"], curves["random"])
    web = stores["corpus"].manifest
    return {
        "seed": cfg.seed, "tokens_trained": summaries["clm"]["tokens"], "ratio": cfg.ratio,
        "token_efficiency": slm_eff, "slm_reached_clm_loss": slm_reached,
        "random_token_efficiency": rnd_eff, "random_reached_clm_loss": rnd_reached,
        "final_target_loss": {name: s[target_key] for name, s in summaries.items()},
        "final_offtarget_loss": {name: s[off_key] for name, s in summaries.items()},
        "answer_accuracy": {name: a["accuracy"] for name, a in accuracy.items()},
        "gold_solution_loss": {name: a["gold_loss"] for name, a in accuracy.items()},
        "final_heldout_selected_loss": {name: s.get("eval/target/selected_loss") for name, s in summaries.items()},
        "final_heldout_unselected_loss": {name: s.get("eval/target/unselected_loss") for name, s in summaries.items()},
        "tokens_per_second": {"prepare": web["n_tokens"] / max(web["seconds"], 1e-9),
                              "score": scores["corpus"].manifest["tokens_per_second"],
                              **{f"train {n}": s["tokens_per_second"] for n, s in summaries.items()}},
        "config": cfg.__dict__,
    }


def write_report(out: Path, heldout: Path, corpus: Path, corpus_scores: Path, cfg: DemoConfig,
                 progress: bool = True, cost: dict | None = None) -> str:
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
                                 target=TARGET), viewer, progress=False, cost=cost)
    if progress:
        print(f"report: {Path(result['path']).resolve()}")
    return result["path"]


def print_table(summary: dict, out: Path) -> None:
    acc = summary.get("answer_accuracy") or {}
    fmt_acc = lambda name: f"{acc[name]:.0%}" if name in acc else "-"  # noqa: E731
    rows = [("run", "target loss", "off-target loss", "answer accuracy", "token efficiency", "compute efficiency")]
    rows.append(("CLM (all tokens)", summary["final_target_loss"]["clm"], summary["final_offtarget_loss"]["clm"],
                 fmt_acc("clm"), "1.00x", "1.00x"))
    rows.append((f"SLM (top {summary['ratio']:.0%} by excess loss)", summary["final_target_loss"]["slm"],
                 summary["final_offtarget_loss"]["slm"], fmt_acc("slm"),
                 format_efficiency(summary["token_efficiency"], summary["slm_reached_clm_loss"]),
                 format_efficiency(summary["compute_efficiency"], summary["slm_reached_clm_loss_compute"])))
    rows.append((f"random {summary['ratio']:.0%} (control)", summary["final_target_loss"]["random"],
                 summary["final_offtarget_loss"]["random"], fmt_acc("random"),
                 format_efficiency(summary["random_token_efficiency"], summary["random_reached_clm_loss"]),
                 format_efficiency(summary["random_compute_efficiency"], summary["random_reached_clm_loss_compute"])))
    print(f"\nrho1 demo: {summary['tokens_trained']:,} tokens per run; target = loss on held-out answer tokens; "
          f"accuracy = 2-shot greedy exact match on {summary['config']['accuracy_problems']} held-out problems")
    widths = [max(len(r[i] if isinstance(r[i], str) else f"{r[i]:.4f}") for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c if isinstance(c, str) else f"{c:.4f}" for c in r]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    stage_s = ", ".join(f"{k} {v:.0f}s" for k, v in summary["stage_seconds"].items())
    print("\ntoken efficiency = tokens CLM needs to reach its final target loss / tokens the run needs to reach it; "
          "compute efficiency = the same in training FLOPs, SLM's scoring pass of the corpus included")
    print_cost(summary["cost"])
    print(f"stages: {stage_s} (total {sum(summary['stage_seconds'].values()):.0f}s, {summary['threads']} CPU threads: "
          f"`--threads {summary['threads']}` reproduces these numbers)")
    if not math.isnan(summary["token_efficiency"]) and summary["token_efficiency"] < 1.0:
        print("SLM did not beat CLM on this run: the table reports it as measured.")
    print(f"summary: {out / 'summary.json'}")
    print(f"report (open in a browser): {Path(summary['report']).resolve()}")
