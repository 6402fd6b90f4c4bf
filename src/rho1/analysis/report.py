"""`rho1 report RUN...`: one self-contained HTML file comparing training runs.

Target loss against tokens (Rho-1 Fig. 1 / 6b), held-out loss of the tokens the reference selects and of
the others (Fig. 6a, 6c), fraction selected and mean excess loss per step, the token dynamics of runs
that have them (`rho1 dynamics`, Fig. 3), a viewer excerpt, and a summary table with token efficiency
against the first run (or the first CLM run). Plots are inline PNG data URIs; the page loads nothing.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import numpy as np
import yaml
from markupsafe import Markup

from rho1.analysis.dynamics import CLASSES, Dynamics, classify
from rho1.analysis.html import render_page
from rho1.analysis.plots import figure, to_data_uri
from rho1.compute import format_count
from rho1.config import ReportConfig
from rho1.data.store import check_writable, read_json, read_jsonl
from rho1.eval.curves import format_efficiency, read_curve, target_key, token_efficiency

BODY = jinja2.Template("""\
<p>{{ runs|length }} run(s); token efficiency = tokens the baseline (<b>{{ baseline }}</b>) needs to reach its own
final {{ target_name }} divided by the tokens the run needs to reach it (dropped tokens count as seen).</p>
<h2>Summary</h2>
<table class="summary"><tr><th>run</th><th>objective</th><th>ratio</th><th>score</th><th>rule</th><th>tokens</th>
{% for key in metric_names %}<th>{{ key[5:] if key.startswith("eval/") else key }}</th>{% endfor %}<th>token efficiency</th></tr>
{% for r in rows %}<tr><td>{{ r.name }}</td><td>{{ r.objective }}</td><td>{{ r.ratio }}</td><td>{{ r.score }}</td><td>{{ r.rule }}</td>
<td>{{ "{:,}".format(r.tokens) }}</td>{% for key in metric_names %}<td>{{ r.metrics.get(key, "") }}</td>{% endfor %}
<td>{{ r.efficiency }}</td></tr>
{% endfor %}</table>
{% for fig in figures %}<figure><img src="{{ fig.uri }}" alt="{{ fig.title }}"></figure>
{% endfor %}
{% for d in dynamics %}<h2>Token dynamics: {{ d.run }}</h2>
<table class="dynamics"><tr><th>class</th>{% for c in classes %}<th>{{ c }}</th>{% endfor %}</tr>
<tr><td>share of {{ "{:,}".format(d.tokens) }} held-out tokens</td>{% for c in classes %}<td>{{ "%.1f%%" % (d.shares[c] * 100) }}</td>{% endfor %}</tr></table>
{% for uri in d.plots %}<figure><img src="{{ uri }}" alt="token dynamics"></figure>{% endfor %}
{% endfor %}
{% if cost %}<h2>What it cost</h2>
<p>Model FLOPs (the count MFU uses; scoring is a forward pass) and wall seconds of each stage. Compute efficiency =
the baseline's training FLOPs to reach its own final {{ target_name }} divided by SLM's training FLOPs to reach it
plus the scoring pass of the whole corpus. The reference is trained once and reused, so it is shown apart with its
break-even: the runs like this one after which SLM's saving has paid for it.</p>
<table class="cost"><tr><th>stage</th><th>FLOPs</th><th>seconds</th></tr>
{% for name, c in cost.stages.items() %}<tr><td>{{ name }}</td><td>{{ c.flops_shown }}</td><td>{{ c.seconds_shown }}</td></tr>
{% endfor %}</table>
<table class="cost"><tr><th>SLM against</th><th>compute efficiency</th><th>reference break-even</th></tr>
{% for name, e in cost.efficiency.items() %}<tr><td>{{ name }}</td><td>{{ e.shown }}</td><td>{{ e.break_even_shown }}</td></tr>
{% endfor %}</table>{% endif %}
{% if viewer %}<h2>Which tokens are selected</h2>{{ viewer }}{% endif %}
""", autoescape=True)

STYLE = "figure { display: inline-block; margin: 0.5em; } img { max-width: 560px; }"


def read_run(path: Path) -> dict:
    if not (path / "metrics.jsonl").is_file():
        raise ValueError(f"{path} is not a run directory of `rho1 train` (no metrics.jsonl)")
    records = read_jsonl(path / "metrics.jsonl")
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    return {"name": path.name, "path": path, "config": config, "records": records,
            "evals": [r for r in records if r["kind"] == "eval"], "steps": [r for r in records if r["kind"] == "train"]}


def _target_key(runs: list[dict]) -> str:
    key = target_key(k for r in runs for e in r["evals"][-1:] for k in e)
    if key is None:
        raise ValueError("the runs have no held-out evaluation to compare; train them with --eval-data")
    return key


def load_dynamics(run: Path) -> Dynamics | None:
    meta_path = run / "dynamics" / "meta.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path, "run `rho1 dynamics` again")
    losses = np.load(run / "dynamics" / "losses.npy", allow_pickle=False)
    tokens = np.array(meta["checkpoint_tokens"])
    classes, delta = classify(losses, tokens, meta["threshold"])
    positions = np.load(run / "dynamics" / "positions.npy", allow_pickle=False)
    return Dynamics(tokens, [c[1] for c in meta["identity"]["checkpoints"]], positions, losses, classes, delta,
                    meta["threshold"])


def _curve_figure(runs, key: str, title: str, ylabel: str, source: str = "evals", x: str = "tokens"):
    fig, ax = figure()
    drawn = False
    for r in runs:
        points = [(p[x], p[key]) for p in r[source] if p.get(key) is not None and p[key] == p[key] and x in p]
        if points:
            ax.plot(*zip(*points), marker="." if source == "evals" else None, label=r["name"])
            drawn = True
    ax.set(xlabel="training FLOPs" if x == "flops" else "tokens trained", ylabel=ylabel, title=title)
    if drawn:
        ax.legend()
        return {"title": title, "uri": to_data_uri(fig)}
    import matplotlib.pyplot as plt

    plt.close(fig)
    return None


def _label_figures(runs) -> list[dict]:
    """Per run with labelled data (``rho1 prepare --label-field``) that selects: the share of each
    source's tokens selected over training."""
    out = []
    for r in runs:
        names = sorted({k.split("/")[1] for s in r["steps"] for k in s if k.startswith("label/")})
        if not names or r["config"].get("objective") != "slm":
            continue
        fig, ax = figure()
        for name in names:
            points = [(s["tokens"], s[f"label/{name}/frac_selected"]) for s in r["steps"]
                      if s.get(f"label/{name}/frac_selected") == s.get(f"label/{name}/frac_selected")]
            ax.plot(*zip(*points), label=name)
        ax.set(xlabel="tokens trained", ylabel="share of the source's tokens selected", ylim=(0, 1),
               title=f"{r['name']}: share selected per source")
        ax.legend()
        out.append({"title": f"{r['name']}: share selected per source", "uri": to_data_uri(fig)})
    return out


def build_report(cfg: ReportConfig, viewer_html: str | None = None, cost: dict | None = None) -> tuple[str, dict]:
    """The page and its summary; ``cost``: a study's compute (rho1.experiments.pipeline.study_cost), shown as such."""
    if not cfg.runs:
        raise ValueError("rho1 report needs at least one run directory")
    runs = [read_run(Path(p)) for p in cfg.runs]
    target = cfg.target or _target_key(runs)
    store = target.split("/")[1]
    baseline = next((r for r in runs if r["name"] == cfg.baseline), None) if cfg.baseline else None
    if cfg.baseline and baseline is None:
        raise ValueError(f"--baseline {cfg.baseline} is not one of the runs ({', '.join(r['name'] for r in runs)})")
    baseline = baseline or next((r for r in runs if r["config"].get("objective") == "clm"), runs[0])
    base_curve = read_curve(baseline["path"] / "metrics.jsonl", target)
    metric_names = [k for k in (target, f"eval/{store}/selected_loss", f"eval/{store}/unselected_loss")
                    if any(k in e for r in runs for e in r["evals"])]
    metric_names += sorted({k for r in runs for e in r["evals"][-1:] for k in e  # other stores' loss (off-target)
                            if k.endswith("/loss") and k.startswith("eval/") and not k.startswith(f"eval/{store}/")})
    rows, summary = [], {"target": target, "baseline": baseline["name"], "runs": {}}
    for r in runs:
        last = r["evals"][-1] if r["evals"] else {}
        curve = read_curve(r["path"] / "metrics.jsonl", target)
        eff, reached = token_efficiency(base_curve, curve) if base_curve and curve else (float("nan"), False)
        efficiency = format_efficiency(eff, reached)
        rows.append({"name": r["name"], "objective": r["config"].get("objective", "?"),
                     "ratio": r["config"].get("ratio") if r["config"].get("objective") == "slm" else 1.0,
                     "score": r["config"].get("score", "") if r["config"].get("objective") == "slm" else "",
                     "rule": r["config"].get("rule", "topk") if r["config"].get("objective") == "slm" else "",
                     "tokens": last.get("tokens", 0),
                     "metrics": {k: f"{last[k]:.4f}" for k in metric_names if isinstance(last.get(k), float)},
                     "efficiency": efficiency})
        summary["runs"][r["name"]] = {"token_efficiency": eff, "reached": reached,
                                      **{k: last.get(k) for k in metric_names}}
    figures = [
        _curve_figure(runs, target, f"{target} against tokens trained", "loss"),
        _curve_figure(runs, target, f"{target} against training FLOPs", "loss", x="flops"),
        _curve_figure(runs, f"eval/{store}/selected_loss", "held-out loss of selected tokens", "loss"),
        _curve_figure(runs, f"eval/{store}/unselected_loss", "held-out loss of unselected tokens", "loss"),
        _curve_figure(runs, "frac_selected", "fraction of tokens selected per step", "fraction", "steps"),
        _curve_figure(runs, "excess_loss_selected", "mean excess loss of selected tokens per step", "nats", "steps"),
        _curve_figure(runs, "excess_loss_unselected", "mean excess loss of unselected tokens per step", "nats",
                      "steps"),
        _curve_figure(runs, "weight_selected", "soft rules: mean weight of the selected tokens per step", "weight",
                      "steps"),
        _curve_figure(runs, "weight_unselected", "soft rules: mean weight of the unselected tokens per step", "weight",
                      "steps"),
    ]
    figures = [f for f in figures if f is not None] + _label_figures(runs)
    dynamics = []
    for r in runs:
        dyn = load_dynamics(r["path"])
        if dyn is not None:
            plots = dyn.plots()
            dynamics.append({"run": r["name"], "tokens": dyn.losses.shape[1], "shares": dyn.shares(),
                             "plots": list(plots.values())})
            summary["runs"][r["name"]]["dynamics_shares"] = dyn.shares()
    body = BODY.render(runs=runs, rows=rows, baseline=baseline["name"], target_name=target, metric_names=metric_names,
                       figures=figures, dynamics=dynamics, classes=CLASSES,
                       viewer=Markup(viewer_html) if viewer_html else None, cost=_shown_cost(cost))
    summary["figures"] = len(figures)
    return render_page("rho1 report: " + ", ".join(r["name"] for r in runs), body, STYLE), summary


def _shown_cost(cost: dict | None) -> dict | None:
    if not cost:
        return None
    stages = {name: {"flops_shown": format_count(c["flops"]) if c.get("flops") is not None else "-",
                     "seconds_shown": f"{c['seconds']:,.0f}" if c.get("seconds") is not None else "-"}
              for name, c in cost["stages"].items()}
    efficiency = {name: {"shown": format_efficiency(e["compute_efficiency"], e["reached"]),
                         "break_even_shown": e["break_even"]} for name, e in cost["efficiency"].items()}
    return {"stages": stages, "efficiency": efficiency}


def report(cfg: ReportConfig, viewer_html: str | None = None, progress: bool = True, cost: dict | None = None) -> dict:
    cfg.check()
    check_writable(cfg.out, folder=False)
    html, summary = build_report(cfg, viewer_html, cost)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html)
    if progress:
        print(f"report: {len(cfg.runs)} run(s), {summary['figures']} plots -> {out.resolve()}")
    return {**summary, "path": str(out)}
