import json
import math
import subprocess
import sys

import numpy as np
import pytest

from rho1.cli import main


def test_quick_demo_runs_every_stage_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "token efficiency" in printed and "SLM (top 60% by excess loss)" in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("token_efficiency", "random_token_efficiency"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    for run in ("clm", "slm", "random"):
        assert math.isfinite(summary["final_target_loss"][run])
        assert math.isfinite(summary["final_offtarget_loss"][run])
        assert (out / run / "final" / "model.safetensors").is_file()
    assert set(summary["stage_seconds"]) == {"data", "prepare", "base", "reference", "score", "train clm",
                                             "train slm", "train random", "accuracy", "report"}
    for run in ("clm", "slm", "random"):  # 2-shot accuracy on the held-out problems, every generation kept
        assert 0.0 <= summary["answer_accuracy"][run] <= 1.0 and summary["gold_solution_loss"][run] > 0
        assert len((out / run / "answers.jsonl").read_text().splitlines()) == 10
    assert "answer accuracy" in printed
    # the demo ends with the HTML report: runs, plots, dynamics of CLM and SLM, the viewer excerpt
    report = (out / "report.html").read_text()
    assert str((out / "report.html").resolve()) in printed
    assert report.count("<img") >= 8 and "Token dynamics: clm" in report and "Token dynamics: slm" in report
    assert report.count('class="t selected"') > 0 and 'data-mode="tendency"' in report
    # the three runs saw the same tokens in the same order
    assert len({json.loads((out / r / "summary.json").read_text())["tokens"] for r in ("clm", "slm", "random")}) == 1


def test_cli_reports_bad_input_in_one_sentence(tmp_path):
    (tmp_path / "latin.txt").write_bytes("na\xefve".encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "rho1", "prepare", str(tmp_path / "latin.txt"), "--out",
                             str(tmp_path / "s"), "--train-tokenizer", "300"], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not UTF-8 text" in lines[0] and "convert it first" in lines[0]


def test_cli_stages_with_yaml_config_and_eval(stores, reference_model, corpus_scores, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {stores['corpus'].path}\nobjective: slm\nscores: {corpus_scores.path}\n"
                      f"model_preset: nano\nseq_len: 64\nbatch_size: 4\nmax_tokens: 2048\nratio: 0.9\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--ratio", "0.5", "--out", str(out)]) == 0
    saved = (out / "config.yaml").read_text()
    assert "ratio: 0.5" in saved and "objective: slm" in saved  # the flag overrides the file
    capsys.readouterr()
    assert main(["eval", "--model", str(reference_model), "--data", str(stores["corpus"].path), "--scores",
                 str(corpus_scores.path), "--seq-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out)["corpus"]
    # the reference model's own scores: its held-out loss is the mean stored score
    assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-3)
    assert result["tokens"] == int(np.isfinite(corpus_scores.scores).sum())
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
