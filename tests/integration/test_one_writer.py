"""One writer per folder, for every command that writes one: a real first process is caught while it
writes (frozen with SIGSTOP at that moment), a real second process with the same command is refused in one
sentence and changes nothing, and once the first goes on, the folder is what that one run makes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, MATH_TEMPLATE, SEQ_LEN

from rho1.data.store import ScoreStore, TokenStore
from rho1.lock import lock_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
HERE = Path(__file__).parent
RHO1 = [sys.executable, "-m", "rho1.cli"]


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def has_train_record(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and '"kind": "train"' in metrics.read_text()


def caught_writing(command: list[str], out: Path, writing) -> subprocess.Popen:
    """The first writer, started and frozen as soon as ``writing()`` says it is writing ``out``."""
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (lock_path(out).exists() and writing()):
        if first.poll() is not None or time.time() > deadline:
            first.kill()
            pytest.fail(f"the first writer ended before it was seen writing {out}: {first.communicate()[1][-2000:]}")
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)
    assert first.poll() is None
    return first


def second_is_refused(command: list[str], out: Path, first: subprocess.Popen) -> None:
    """While the first writer holds ``out`` (frozen mid-write), the same command in a second process is one
    sentence, exit 2, and leaves every file as it was; then the first goes on to the end."""
    try:
        assert lock_path(out).exists(), "the first writer dropped its lock while it writes"
        before = snapshot(out.parent)
        second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr[-2000:]
        assert len(lines) == 1 and "is being written by another process" in lines[0], lines
        assert f"pid {first.pid}" in lines[0] and "Traceback" not in second.stderr
        assert snapshot(out.parent) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert not lock_path(out).exists() and not list(out.parent.glob("*.partial"))


def test_prepare(stores, tmp_path):
    out = tmp_path / "store"
    sources = [str(DATA / "tinyshakespeare" / "input.txt"), str(DATA / "gsm8k" / "train.jsonl")] * 6
    command = [*RHO1, "prepare", *sources, "--tokenizer", str(stores["reference"].path), "--template", MATH_TEMPLATE,
               "--out", str(out)]
    second_is_refused(command, out, caught_writing(command, out, lambda: True))
    alone = TokenStore.open(out).verify()
    assert alone.manifest["n_docs"] == 6 * (1 + len((DATA / "gsm8k" / "train.jsonl").read_text().splitlines()))


def test_score(stores, reference_model, tmp_path):
    out = tmp_path / "scores"
    command = [*RHO1, "score", "--data", str(stores["corpus"].path), "--model", str(reference_model), "--seq-len",
               str(SEQ_LEN), "--chunk-windows", "1", "--batch-size", "1", "--out", str(out)]
    writing = lambda: (out / "progress").is_dir() and any((out / "progress").iterdir())  # noqa: E731
    second_is_refused(command, out, caught_writing(command, out, writing))
    assert ScoreStore.open(out, stores["corpus"]).verify().manifest["complete"] is True


def test_export(stores, reference_model, corpus_scores, tmp_path):
    out = tmp_path / "export"
    command = [*RHO1, "export", "--data", str(stores["corpus"].path), "--model", str(reference_model), "--scores",
               str(corpus_scores.path), "--batch-size", "1", "--out", str(out)]
    second_is_refused(command, out, caught_writing(command, out, lambda: True))
    assert json.loads((out / "manifest.json").read_text())["windows"] == stores["corpus"].num_windows(SEQ_LEN)


TRAIN_REFERENCES = {"stored scores": lambda s, ref, scores: ["--scores", str(scores.path)],
                    "online reference": lambda s, ref, scores: ["--reference", str(ref)],
                    "self reference": lambda s, ref, scores: ["--reference", "self", "--model", str(ref)]}


@pytest.mark.parametrize("reference", list(TRAIN_REFERENCES))
def test_train(stores, reference_model, corpus_scores, tmp_path, reference):
    out = tmp_path / "run"
    steps = 60
    command = [*RHO1, "train", "--data", str(stores["corpus"].path), "--objective", "slm", "--model-preset", "nano",
               "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--max-tokens", str(steps * 2 * SEQ_LEN),
               "--out", str(out), *TRAIN_REFERENCES[reference](stores, reference_model, corpus_scores)]
    second_is_refused(command, out, caught_writing(command, out, lambda: has_train_record(out)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
    assert (out / "final" / "config.json").is_file()


def test_eval(stores, reference_model, corpus_scores, tmp_path):
    out = tmp_path / "results.json"
    command = [*RHO1, "eval", "--model", str(reference_model), "--data", str(stores["corpus"].path), "--scores",
               str(corpus_scores.path), "--batch-size", "1", "--out", str(out)]
    second_is_refused(command, out, caught_writing(command, out, lambda: True))
    assert json.loads(out.read_text())["corpus"]["tokens"] > 0


def test_sweep(stores, corpus_scores, tmp_path):
    out = tmp_path / "sweep"
    command = [*RHO1, "sweep", "--data", str(stores["corpus"].path), "--scores", str(corpus_scores.path),
               "--model-preset", "nano", "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--max-tokens", "4096",
               "--eval-data", str(stores["heldout"].path), "--ratios", "0.6", "1.0", "--score-functions", "excess",
               "--out", str(out)]
    writing = lambda: any(has_train_record(run) for run in out.glob("*"))  # noqa: E731
    second_is_refused(command, out, caught_writing(command, out, writing))
    assert set(json.loads((out / "sweep.json").read_text())["runs"]) == {"ratio-0.6", "clm"}


def test_demo(tmp_path):
    out = tmp_path / "demo"
    command = [*RHO1, "demo", "--preset", "quick", "--accuracy-problems", "0", "--out", str(out)]
    writing = lambda: (out / "data").is_dir()  # noqa: E731
    second_is_refused(command, out, caught_writing(command, out, writing))
    assert json.loads((out / "summary.json").read_text())["final_target_loss"].keys() == {"clm", "slm", "random"}


def test_selective_trainer(stores, reference_model, tmp_path):
    out = tmp_path / "trainer"
    command = [sys.executable, str(HERE / "selective_trainer_writer.py"), str(stores["corpus"].path),
               str(reference_model), str(out)]
    writing = lambda: any(out.glob("checkpoint-*"))  # noqa: E731
    second_is_refused(command, out, caught_writing(command, out, writing))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-300", "checkpoint-400"]
    assert all((p / "reference.safetensors").is_file() for p in out.glob("checkpoint-*"))
