"""`rho1 pipeline RECIPE.yaml`: a new user's three jsonl files and a ten-line recipe give the table and the report in
one command; the same recipe again runs nothing; a changed ratio trains SLM and random again and nothing else; a
killed pipeline resumes; bad recipes are one sentence naming the key."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DATA

from rho1.cli import main
from rho1.config import Recipe, config_from_dict
from rho1.config.pipeline import EXAMPLE

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> Path:
    """What a user brings: clean problems, a corpus of web-like text mixed with problems, held-out problems."""
    d = tmp_path_factory.mktemp("user")
    problems = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:30]]
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:40_000]
    corpus = [{"text": f"Question: {p['question']}\nAnswer: {p['answer']}"} for p in problems[150:300]]
    corpus += [{"text": text[i : i + 800]} for i in range(0, len(text), 800)]
    for name, rows in (("clean", problems[:150]), ("corpus", corpus), ("heldout", held_out)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def recipe_file(folder: Path, files: Path, **changes) -> Path:
    recipe = {"model": "nano", "reference_data": [str(files / "clean.jsonl")], "corpus": [str(files / "corpus.jsonl")],
              "target": [str(files / "heldout.jsonl")], "tokens": 4096, "ratio": 0.6, "baselines": ["clm", "random"],
              "vocab_size": 512, "reference_tokens": 8192, "eval_points": 4, "out": str(folder / "study"),
              "train": {"seq-len": 64, "batch-size": 8, "lr": 3e-3, "warmup-steps": 2}, **changes}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_lines(printed: str) -> dict:
    """Each stage and what the pipeline did with it: running, resuming or cached."""
    found = {}
    for line in printed.splitlines():
        if line.startswith("pipeline: ") and ": " in line[10:] and line.split(": ")[2].split(" ")[0] in (
                "running", "resuming", "cached"):
            found[line.split(": ")[1]] = line.split(": ")[2].split(" ")[0]
    return found


def test_one_command_then_cached_then_one_changed_stage(user_files, tmp_path, capsys):
    recipe = recipe_file(tmp_path, user_files)
    assert main(["pipeline", str(recipe)]) == 0
    printed = capsys.readouterr().out
    stages = stage_lines(printed)
    assert stages == {s: "running" for s in ("prepare corpus", "prepare reference_data", "prepare target", "reference",
                                             "score corpus", "score target", "train slm", "train clm", "train random")}
    out = tmp_path / "study"
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "eval/target/target_loss" and set(results["runs"]) == {"slm", "clm", "random"}
    for name in ("clm", "random"):
        assert results["runs"][name]["slm_token_efficiency"] > 0 and results["runs"][name]["tokens"] == 4096
    assert "token efficiency" in printed and "slm " in printed and str(out / "results.json") in printed
    # what it cost: every stage's FLOPs and seconds, compute efficiency beside token efficiency, the break-even
    cost = results["cost"]
    assert set(cost["stages"]) == {"train reference", "score corpus", "score target", "train slm", "train clm",
                                   "train random"}
    assert all(c["flops"] > 0 and c["seconds"] >= 0 for c in cost["stages"].values())
    scored = json.loads((out / "scores" / "corpus" / "manifest.json").read_text())
    assert scored["flops"] == scored["n_tokens"] * scored["flops_per_token"] == cost["efficiency"]["clm"][
        "scoring_flops"]
    clm = json.loads((out / "clm" / "summary.json").read_text())
    # every token forward and backward, less the head backward of each window's first token (it predicts nothing)
    assert cost["stages"]["train clm"]["flops"] == clm["train_flops"] == pytest.approx(4096 * clm["flops_per_token"],
                                                                                       rel=0.01)
    assert cost["stages"]["train slm"]["flops"] < clm["train_flops"]  # the head's backward of dropped tokens
    for name in ("clm", "random"):
        e = cost["efficiency"][name]
        assert results["runs"][name]["slm_compute_efficiency"] == pytest.approx(
            e["baseline_flops"] / e["slm_flops_with_scoring"]) and e["slm_flops_with_scoring"] > e["scoring_flops"]
        assert e["break_even"] == "never" if e["compute_efficiency"] <= 1 else e["break_even"].startswith("after ")
    assert "compute efficiency" in printed and "cost: train reference" in printed and "break-even" in printed
    assert "What it cost" in (out / "report.html").read_text()
    assert "reference: target" in printed  # the reference against its start, before scoring
    assert "<img" in (out / "report.html").read_text()
    # the same recipe again: nothing runs, the same results
    finals = {n: (out / n / "final" / "model.safetensors").stat().st_mtime_ns for n in ("slm", "clm", "random")}
    assert main(["pipeline", str(recipe)]) == 0
    again = capsys.readouterr().out
    assert set(stage_lines(again).values()) == {"cached"} and len(stage_lines(again)) == 9
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    assert finals == {n: (out / n / "final" / "model.safetensors").stat().st_mtime_ns for n in finals}
    # another ratio: SLM and random train again (both select by it), nothing else
    assert main(["pipeline", str(recipe_file(tmp_path, user_files, ratio=0.4))]) == 0
    changed = stage_lines(capsys.readouterr().out)
    assert {s for s, what in changed.items() if what == "running"} == {"train slm", "train random"}
    assert (out / "clm" / "final" / "model.safetensors").stat().st_mtime_ns == finals["clm"]
    assert "ratio: 0.4" in (out / "slm" / "config.yaml").read_text()


def test_a_killed_pipeline_resumes_where_it_stopped(user_files, tmp_path):
    recipe = recipe_file(tmp_path, user_files, tokens=16384, baselines=["clm"])
    out = tmp_path / "study"
    command = [sys.executable, "-m", "rho1", "pipeline", str(recipe)]
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "slm" / "checkpoints").glob("[0-9]*")):  # SLM saved a checkpoint: kill it
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (out / "results.json").exists()
    second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    stages = stage_lines(second.stdout)
    assert stages["reference"] == stages["score corpus"] == "cached" and stages["train slm"] == "resuming"
    assert "train slm: resuming from" in second.stdout or "resuming from" in second.stdout
    records = [json.loads(line) for line in (out / "slm" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 16384 // (8 * 64)
    assert json.loads((out / "results.json").read_text())["runs"]["clm"]["slm_token_efficiency"] > 0


BAD = {
    "unknown key": ({"lrr": 0.1}, "recipe {path} has an unknown key 'lrr'; valid keys: model, corpus"),
    "wrong type": ({"tokens": "many"}, "recipe {path}: tokens must be a whole number, got 'many'"),
    "section key": ({"train": {"learning-rate": 1}}, "recipe {path}: train has an unknown key 'learning-rate'"),
    "set by the pipeline": ({"train": {"data": "x"}}, "recipe {path}: train: data is set by the pipeline itself"),
    "runs' evaluations": ({"train": {"eval-every": 8}}, "recipe {path}: train: eval-every is set by the pipeline"),
    "no corpus": ({"corpus": []}, "recipe {path} has no corpus"),
    "two references": ({"reference": "runs/ref/final"}, "needs exactly one of reference_data"),
    "bad baseline": ({"baselines": ["clm", "soft"]}, "--baselines must be one of clm, random, got 'soft'"),
    "bad ratio": ({"ratio": 1.5}, "selection ratio must be in (0, 1], got 1.5"),
    "a model that is not there": ({"model": "./no-such-model"}, "model ./no-such-model does not exist"),
    "a .gguf that is not there": ({"model": "smollm2.gguf"}, "model smollm2.gguf does not exist"),
    "base of a pretrained model": ({"model": "runs/x/final", "base_tokens": 10},
                                   "base_tokens pretrains a fresh preset model"),
}


def test_an_out_that_holds_other_files_is_refused(user_files, tmp_path, capsys):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "notes.txt").write_text("mine")
    assert main(["pipeline", str(recipe_file(tmp_path, user_files))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds files no pipeline wrote" in err[0], err
    assert [p.name for p in (tmp_path / "study").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_recipe_is_one_sentence_naming_the_key(user_files, tmp_path, capsys, case):
    changes, message = BAD[case]
    path = recipe_file(tmp_path, user_files, **changes)
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(path=path) in err[0], err
    assert not (tmp_path / "study").exists()  # refused before any work


def test_the_example_recipe_is_a_recipe_and_a_worse_reference_is_reported(user_files, reference_model, tmp_path,
                                                                         capsys):
    example = yaml.safe_load(EXAMPLE)
    assert example["train"]["lr"] == "5e-5"  # YAML 1.1 reads a float without a dot as a string...
    recipe = config_from_dict(Recipe, example, "the example")
    assert recipe.options("train")["lr"] == 5e-5  # ... and the stage gets the float
    assert main(["pipeline", "--example"]) == 0
    assert capsys.readouterr().out == EXAMPLE
    # a trained model as the start, a reference that never trained: said before scoring, in one sentence
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import build_model

    tokenizer = load_tokenizer(reference_model)
    fresh = build_model("nano", len(tokenizer), 512, tokenizer.eos_token_id, seed=3)
    fresh.save_pretrained(tmp_path / "fresh")
    tokenizer.save_pretrained(tmp_path / "fresh")
    path = recipe_file(tmp_path, user_files, model=str(reference_model), reference=str(tmp_path / "fresh"),
                       reference_data=[], baselines=["clm"], tokens=1024)
    assert main(["pipeline", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "warning: the reference is no better than the start on target" in printed
    assert "so its excess loss would select noise" in printed
