"""`rho1 pipeline RECIPE.yaml`: the study the demo runs, on your data and model, in one command.

Every stage is the stage itself (`rho1 prepare`, `train`, `score`, `report`), each writing its own folder under
the recipe's ``out``:

    stores/<corpus, reference, target, offtarget>   TokenStores (one tokenizer: the model's, or a BPE of the corpus)
    base/        a fresh preset pretrained on the corpus (base_tokens), the start of everything after it
    reference/   the start trained on reference_data (unless the recipe names a trained reference)
    scores/      the reference's losses of the corpus (and of the target, for the selected / unselected split)
    slm/ clm/ random/   SLM and the baselines (run folders of `rho1 train`), evaluated on the target as they train
    results.json, report.html

Each stage is cached by its inputs (OUT/.stages/<stage>.json keeps their digest): run the recipe again and
nothing runs; change ``ratio`` and only SLM and random train again; change the reference data and the reference,
the scores and SLM follow, not CLM. A stage killed halfway resumes (training from its newest checkpoint,
scoring from its finished chunks) when the same recipe runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rho1.compute import format_count
from rho1.config import PrepareConfig, ReportConfig, ScoreConfig, TrainConfig
from rho1.config.options import MODEL_PRESETS
from rho1.config.pipeline import Recipe
from rho1.data.prepare import prepare
from rho1.data.sources import expand_sources
from rho1.data.store import ScoreStore, TokenStore, check_writable, read_json, write_json_atomic
from rho1.eval.accuracy import QA_TEMPLATE
from rho1.eval.curves import format_efficiency, read_curve, target_key, token_efficiency
from rho1.lock import write_lock
from rho1.pretrained import locate
from rho1.threads import set_threads
from rho1.train import train


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stamps(sources: list[str]) -> list:
    """What the inputs are, cheaply: every file under the sources with its size and modification time."""
    return [[str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns]
            if not isinstance(f, str) or not f.startswith("hf:") else [f] for f in expand_sources(sources)]


def model_identity(name: str) -> str | list:
    """A model named in the recipe: a preset, or a path's files (size, time), or a hub name as it is."""
    path = Path(name)
    if name in MODEL_PRESETS:
        return f"preset {name}"
    if path.is_file():
        return file_stamps([name])
    if path.is_dir():
        return file_stamps([str(p) for p in sorted(path.iterdir()) if p.is_file()])
    return name


def record_format(sources: list[str]) -> dict:
    """How `rho1 prepare` reads the files, from the fields of their first record: chats (messages), question and
    answer, prompt and completion (the answer or completion is the target), or text."""
    first = next(iter(expand_sources(sources)), None)
    keys: set = set()
    if isinstance(first, Path) and first.suffix in (".jsonl", ".json"):
        with open(first, encoding="utf-8", errors="replace") as f:
            line = next((raw for raw in f if raw.strip()), "{}")
        try:
            record = json.loads(line)
            keys = set(record) if isinstance(record, dict) else set()
        except ValueError:
            keys = set()  # `rho1 prepare` names the file and line
    elif isinstance(first, Path) and first.suffix == ".parquet":
        import pyarrow.parquet as pq

        keys = set(pq.read_schema(first).names)
    if "messages" in keys:
        return {"chat_field": "messages"}
    if {"question", "answer"} <= keys:
        return {"template": QA_TEMPLATE, "target_field": "answer"}
    if {"prompt", "completion"} <= keys:
        return {"template": "{prompt}{completion}", "target_field": "completion"}
    return {"text_field": "text"} if "text" in keys else {}


class Stages:
    """Runs each stage unless its output is there from the same inputs; says which stage runs and what is cached."""

    def __init__(self, out: Path, progress: bool):
        self.out, self.progress, self.seconds = out, progress, {}
        (out / ".stages").mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, inputs: dict, folder: Path, run, load):
        key, state_path = digest(inputs), self.out / ".stages" / f"{name.replace(' ', '-')}.json"
        state = read_json(state_path) if state_path.is_file() else {}
        if state.get("key") == key and state.get("finished") and folder.exists():
            self.say(f"{name}: cached ({folder})")
            self.seconds[name] = 0.0
            return load(), key
        if state.get("key") != key:  # made from other inputs (or never): it goes
            shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
        self.say(f"{name}: {'resuming' if state.get('key') == key else 'running'} -> {folder}")
        write_json_atomic(state_path, {"key": key, "finished": False, "inputs": inputs})
        start = time.time()
        result = run()
        self.seconds[name] = round(time.time() - start, 1)
        write_json_atomic(state_path, {"key": key, "finished": True, "inputs": inputs, "seconds": self.seconds[name]})
        return result, key

    def say(self, text: str) -> None:
        if self.progress:
            print(f"pipeline: {text}", flush=True)


@dataclass
class Study:
    """What the stages of a recipe made: the stores, score stores and runs (their summaries), and each stage's time."""

    stores: dict
    scores: dict
    runs: dict
    stages: Stages


def run_pipeline(recipe: Recipe, progress: bool = True) -> dict:
    """The whole study of a recipe (see the module's docstring); returns the results written to OUT/results.json."""
    recipe.check()
    # a mistyped model would otherwise be found by the first stage, after the stage's older output is gone
    if recipe.model not in MODEL_PRESETS:
        locate(recipe.model, "model")
    if recipe.reference:
        locate(recipe.reference, "reference")
    out = Path(recipe.out)
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not (out / ".stages").is_dir():
        raise ValueError(f"out {out} holds files no pipeline wrote; choose a new or empty folder (a pipeline replaces "
                         "what its stages made there)")
    if recipe.threads:
        set_threads(recipe.threads)
    with write_lock(out, "rho1 pipeline"):
        study = run_stages(recipe, progress)
        return results(recipe, out, study, progress)


def run_stages(recipe: Recipe, progress: bool = True) -> Study:
    """Every stage of the recipe, each kept when its inputs did not change (the caller holds the lock of OUT)."""
    out = Path(recipe.out)
    stages = Stages(out, progress)
    stores = prepare_stores(recipe, out, stages, progress)
    start, start_id = base_model(recipe, out, stores, stages, progress)
    reference, reference_id = reference_model(recipe, out, stores, start, start_id, stages, progress)
    scores = score_stores(recipe, out, stores, reference, reference_id, stages, progress)
    runs = train_runs(recipe, out, stores, scores, start, start_id, stages, progress)
    return Study(stores, scores, runs, stages)


def prepare_stores(recipe: Recipe, out: Path, stages: Stages, progress: bool) -> dict:
    """The corpus with the model's tokenizer (a preset: a BPE trained on the corpus), then the other files with it."""
    options = recipe.options("prepare")
    fresh = recipe.model in MODEL_PRESETS
    stores = {}
    for name in ("corpus", "reference_data", "target", "offtarget"):
        sources = getattr(recipe, name)
        if not sources:
            continue
        folder = out / "stores" / name.removesuffix("_data")
        if name == "corpus":
            tokenizer = {"train_tokenizer": recipe.vocab_size} if fresh else {"tokenizer": recipe.model}
        else:
            tokenizer = {"tokenizer": str(stores["corpus"].path)}
        cfg = PrepareConfig(sources, str(folder), overwrite=True,
                            **{**record_format(sources), **tokenizer, **options})
        inputs = {"files": file_stamps(sources), "tokenizer": stores["corpus"].tokenizer_hash if name != "corpus" else
                  model_identity(recipe.model), "config": {**vars(cfg), "out": None}}
        stores[name], _ = stages(f"prepare {name}", inputs, folder, lambda cfg=cfg: prepare(cfg, progress),
                                 lambda folder=folder: TokenStore.open(folder).check())
    return stores


def train_config(recipe: Recipe, **kw) -> TrainConfig:
    return TrainConfig(**{"seed": recipe.seed, "threads": recipe.threads, **recipe.options("train"), **kw})


def _summary(folder: Path) -> dict:
    return read_json(folder / "summary.json")


def _resumable(cfg: TrainConfig) -> TrainConfig:
    """A run that a killed pipeline resumes: checkpoints every ~eighth of it unless the recipe says otherwise."""
    step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    every = cfg.save_every or max(step, cfg.max_tokens // 8 // step * step)
    return replace(cfg, save_every=every, resume=Path(cfg.out).exists())


def base_model(recipe: Recipe, out: Path, stores: dict, stages: Stages, progress: bool) -> tuple[str, object]:
    """(the model every later stage starts from, its identity): the recipe's model, or a fresh preset pretrained on
    the corpus (base_tokens, in another data order than the runs that continue from it)."""
    fresh = recipe.model in MODEL_PRESETS
    if not (fresh and recipe.base_tokens):
        return (None if fresh else recipe.model), model_identity(recipe.model)
    cfg = train_config(recipe, data=str(stores["corpus"].path), out=str(out / "base"), model_preset=recipe.model,
                       max_tokens=recipe.base_tokens, seed=recipe.seed + 1)
    inputs = {"corpus": stores["corpus"].hash, "config": {**vars(cfg), "out": None, "threads": None}}
    _, key = stages("base", inputs, out / "base", lambda: train(_resumable(cfg), progress),
                    lambda: _summary(out / "base"))
    return str(out / "base" / "final"), f"stage base {key}"


def reference_model(recipe: Recipe, out: Path, stores: dict, start: str | None, start_id, stages: Stages,
                    progress: bool) -> tuple[str, object]:
    """(the reference, its identity): the recipe's trained one, or the start trained on reference_data; said in one
    sentence when it is no better than the start on the target (its excess loss would select noise)."""
    if recipe.reference:
        identity = model_identity(recipe.reference)
        if start and "target" in stores:
            compare_on_target(out, start, start_id, recipe.reference, identity, stores["target"], stages)
        return recipe.reference, identity
    store = stores["reference_data"]
    measured_on = stores.get("target") or store
    tokens = recipe.reference_tokens or 2 * store.n_tokens
    cfg = train_config(recipe, data=str(store.path), out=str(out / "reference"), max_tokens=tokens,
                       eval_data=[str(measured_on.path)], **({"model": start} if start else
                                                             {"model_preset": recipe.model}))
    cfg = replace(cfg, **recipe.options("reference_train"))
    inputs = {"start": start_id, "data": store.hash, "measured_on": measured_on.hash,
              "config": {**vars(cfg), "out": None, "model": None, "threads": None}}
    _, key = stages("reference", inputs, out / "reference", lambda: train(_resumable(cfg), progress),
                    lambda: _summary(out / "reference"))
    check_reference(out / "reference", measured_on, stages)
    return str(out / "reference" / "final"), f"stage reference {key}"


def check_reference(run: Path, measured_on: TokenStore, stages: Stages) -> None:
    """The reference's held-out loss against its start's (the run's first and last evaluations)."""
    key = target_key(k for r in read_curve_records(run) for k in r)
    curve = read_curve(run / "metrics.jsonl", key) if key else []
    if len(curve) < 2:
        return
    (_, before), (_, after) = curve[0], curve[-1]
    what = "target" if "target" in key else "loss"
    if after >= before:
        stages.say(f"warning: the reference is no better than the model it started from on {measured_on.path.name} "
                   f"({what} {after:.4f} vs {before:.4f}), so its excess loss would select noise; train it longer "
                   "(reference_tokens), on more or cleaner reference_data, or name a trained reference")
    else:
        stages.say(f"reference: {what} {after:.4f} on {measured_on.path.name}, from {before:.4f} at its start")


def compare_on_target(out: Path, start: str, start_id, reference: str, reference_id, target: TokenStore,
                      stages: Stages) -> None:
    """A reference the recipe names, against the start, on the target (`rho1 eval` of both, kept in a file)."""
    from rho1.config import EvalConfig
    from rho1.evaluate import evaluate_model

    path = out / "reference_check.json"

    def measure() -> dict:
        losses = {name: evaluate_model(EvalConfig(model=model, data=[str(target.path)]), progress=False)
                  for name, model in (("start", start), ("reference", reference))}
        checked = {name: r[target.path.name] for name, r in losses.items()}
        write_json_atomic(path, checked)
        return checked

    checked, _ = stages("check reference", {"start": start_id, "reference": reference_id, "target": target.hash},
                        path, measure, lambda: read_json(path))
    metric = "target_loss" if "target_loss" in checked["start"] else "loss"
    before, after = checked["start"][metric], checked["reference"][metric]
    if after >= before:
        stages.say(f"warning: the reference is no better than the start on {target.path.name} ({metric} {after:.4f} "
                   f"vs {before:.4f}), so its excess loss would select noise; name a better reference, or train one "
                   "with reference_data")


def read_curve_records(run: Path) -> list[dict]:
    from rho1.data.store import read_jsonl

    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "eval"]


def score_stores(recipe: Recipe, out: Path, stores: dict, reference: str, reference_id, stages: Stages,
                 progress: bool) -> dict:
    """The reference's losses of the corpus (what SLM selects by) and of the target (the held-out split)."""
    seq_len = train_config(recipe).seq_len
    scores = {}
    for name in ("corpus", "target"):
        if name not in stores:
            continue
        folder = out / "scores" / name
        cfg = ScoreConfig(str(stores[name].path), reference, str(folder), seq_len,
                          **{"threads": recipe.threads, **recipe.options("score")})
        inputs = {"store": stores[name].hash, "reference": reference_id,
                  "config": {**vars(cfg), "out": None, "model": None, "threads": None}}
        scores[name], _ = stages(f"score {name}", inputs, folder, lambda cfg=cfg: _score(cfg, progress),
                                 lambda folder=folder, store=stores[name]: ScoreStore.open(folder, store).check())
    return scores


def _score(cfg: ScoreConfig, progress: bool) -> ScoreStore:
    from rho1.score import score

    return score(cfg, progress)


def train_runs(recipe: Recipe, out: Path, stores: dict, scores: dict, start: str | None, start_id, stages: Stages,
               progress: bool) -> dict:
    """SLM and each baseline from the same start, on the same windows in the same order, evaluated on the target."""
    held_out = [n for n in ("target", "offtarget") if n in stores]
    common = train_config(recipe)
    step = common.batch_size * common.grad_accum * common.seq_len
    every = max(step, recipe.tokens // recipe.eval_points // step * step)  # whole steps: every run evaluates alike
    common = train_config(recipe, data=str(stores["corpus"].path), max_tokens=recipe.tokens, eval_every=every,
                          ratio=recipe.ratio, eval_data=[str(stores[n].path) for n in held_out],
                          eval_scores=[str(scores[n].path) if n in scores else "" for n in held_out],
                          **({"model": start} if start else {"model_preset": recipe.model}))
    recipes = {"slm": dict(objective="slm", scores=str(scores["corpus"].path), ratio=recipe.ratio),
               "clm": dict(objective="clm"),
               "random": dict(objective="slm", score="random", ratio=recipe.ratio)}
    runs = {}
    for name in ["slm", *recipe.baselines]:
        cfg = replace(common, out=str(out / name), **recipes[name])
        # what the run's training depends on: CLM neither on the ratio nor on the reference
        inputs = {"corpus": stores["corpus"].hash, "start": start_id,
                  "held_out": [stores[n].hash for n in held_out],
                  "scores": scores["corpus"].manifest["sha256"] if name == "slm" else None,
                  "config": {**vars(cfg), "out": None, "model": None, "scores": None, "eval_scores": None,
                             "threads": None, "ratio": cfg.ratio if name != "clm" else None}}
        runs[name], _ = stages(f"train {name}", inputs, out / name, lambda cfg=cfg: train(_resumable(cfg), progress),
                               lambda name=name: _summary(out / name))
    return runs


def study_cost(out: Path, key: str | None, runs: dict, scores: dict, trained_reference: bool) -> dict:
    """What the study cost: each stage's model FLOPs and wall seconds, and SLM's compute efficiency against each
    baseline (rho1.compute.compute_efficiency: the scoring pass of the corpus counted), with the break-even of the
    reference's training (paid once, reused by every run), as runs like this one, or "never"."""
    from rho1.compute import break_even, compute_efficiency

    stages = {}
    for name in ("base", "reference"):
        path = out / name / "summary.json"
        if path.is_file() and (name == "base" or trained_reference):
            summary = read_json(path)
            stages[f"train {name}"] = {"flops": summary.get("train_flops"), "seconds": summary.get("seconds")}
    for name, store in scores.items():
        stages[f"score {name}"] = {"flops": store.manifest.get("flops"), "seconds": store.manifest.get("seconds")}
    for name, summary in runs.items():
        stages[f"train {name}"] = {"flops": summary.get("train_flops"), "seconds": summary.get("seconds")}
    scoring = scores["corpus"].manifest.get("flops") if "corpus" in scores else None
    reference = (stages.get("train reference") or {}).get("flops")
    curves = {n: read_curve(out / n / "metrics.jsonl", key, x="flops") for n in runs} if key else {}
    efficiency = {}
    for name in (n for n in runs if n != "slm" and key):
        ratio, reached, needed, paid = compute_efficiency(curves[name], curves["slm"], scoring or float("nan"))
        runs_to_pay = break_even(reference, needed, paid) if reference and ratio == ratio else None
        efficiency[name] = {"compute_efficiency": ratio, "reached": reached, "baseline_flops": needed,
                            "slm_flops_with_scoring": paid, "scoring_flops": scoring,
                            "break_even": ("no reference trained here" if not reference else
                                           "never" if runs_to_pay is None else
                                           f"after {runs_to_pay:,} run{'s' if runs_to_pay > 1 else ''}")}
    return {"stages": stages, "efficiency": efficiency}


def results(recipe: Recipe, out: Path, study: Study, progress: bool) -> dict:
    """The table (target loss, token and compute efficiency of SLM against each baseline, FLOPs, tokens, wall time)
    on the terminal and in OUT/results.json, what each stage cost, and OUT/report.html."""
    from rho1.analysis.report import report

    runs = study.runs
    key = target_key(k for s in runs.values() for k in s)
    curves = {n: read_curve(out / n / "metrics.jsonl", key) for n in runs} if key else {}
    cost = study_cost(out, key, runs, study.scores, trained_reference=not recipe.reference)
    rows = {}
    for name, summary in runs.items():
        row = {"tokens": summary["tokens"], "seconds": summary["seconds"], "train_flops": summary.get("train_flops"),
               "target_loss": summary.get(key)}
        if name != "slm" and key:
            value, reached = token_efficiency(curves[name], curves["slm"])
            row.update(slm_token_efficiency=value, slm_reached=reached,
                       slm_compute_efficiency=cost["efficiency"][name]["compute_efficiency"],
                       slm_compute_reached=cost["efficiency"][name]["reached"])
        rows[name] = row
    result = {"recipe": {k: v for k, v in vars(recipe).items()}, "metric": key, "runs": rows,
              "stage_seconds": study.stages.seconds, "cost": cost}
    if key:
        baseline = "clm" if "clm" in runs else None
        report(ReportConfig(runs=[str(out / n) for n in runs], out=str(out / "report.html"), target=key,
                            baseline=baseline), progress=False, cost=cost)
        result["report"] = str(out / "report.html")
    write_json_atomic(out / "results.json", result)
    if progress:
        print_results(result, out)
    return result


def print_results(result: dict, out: Path) -> None:
    metric = result["metric"] or "no target (pass target: for held-out numbers)"
    print(f"\nrho1 pipeline: {metric}; token efficiency = tokens the baseline needs to reach its final loss / tokens "
          "SLM needs to reach it; compute efficiency = the same in training FLOPs, SLM's scoring pass included")
    print(f"{'run':<8} {'tokens':>10} {'target loss':>12} {'SLM tokens eff.':>22} {'SLM compute eff.':>22} "
          f"{'train FLOPs':>12} {'seconds':>9}")
    for name, row in result["runs"].items():
        loss = "-" if row["target_loss"] is None else f"{row['target_loss']:.4f}"
        eff = format_efficiency(row["slm_token_efficiency"], row["slm_reached"]) if "slm_token_efficiency" in row \
            else ""
        ceff = format_efficiency(row["slm_compute_efficiency"], row["slm_compute_reached"]) \
            if "slm_compute_efficiency" in row else ""
        flops = format_count(row["train_flops"]) if row.get("train_flops") is not None else "-"
        print(f"{name:<8} {row['tokens']:>10,} {loss:>12} {eff:>22} {ceff:>22} {flops:>12} {row['seconds']:>9.0f}")
    print_cost(result["cost"])
    print(f"results: {out / 'results.json'}" + (f"; report: {Path(result['report']).resolve()}"
                                                  if result.get("report") else ""))


def print_cost(cost: dict) -> None:
    """Each stage's FLOPs and seconds on one line, then the reference's break-even against each baseline."""
    shown = [f"{name} {format_count(c['flops']) if c.get('flops') is not None else '-'} in "
             f"{c['seconds'] or 0:,.0f}s" for name, c in cost["stages"].items()]
    print("cost: " + "; ".join(shown))
    for name, e in cost["efficiency"].items():
        print(f"reference (trained once, reused) against {name}: break-even {e['break_even']}")
