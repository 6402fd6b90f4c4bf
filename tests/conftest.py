"""Shared fixtures: small real corpora shipped in tests/data (slices of GSM8K and Tiny Shakespeare, see
tests/data/README.md), tokenized once per session, and a tiny reference model trained for real on GSM8K."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
import transformers

from rho1.data.prepare import PrepareConfig, prepare
from rho1.eval.accuracy import QA_TEMPLATE
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MATH_TEMPLATE = QA_TEMPLATE
SEQ_LEN = 64


def data_file(*parts) -> Path:
    """A file shipped under tests/data (the tests read nothing outside the repository)."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data {path} is missing from the repository")
    return path


def _head_jsonl(src: Path, dst: Path, start: int, n: int) -> Path:
    lines = src.read_text().splitlines()[start : start + n]
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> dict[str, Path]:
    """Small jsonl/txt slices of tests/data, copied so a test may change them."""
    d = tmp_path_factory.mktemp("data")
    train_jsonl = data_file("gsm8k", "train.jsonl")
    shakespeare = data_file("tinyshakespeare", "input.txt").read_text()[:60_000]
    (d / "shakespeare.txt").write_text(shakespeare)
    return {
        "reference": _head_jsonl(train_jsonl, d / "reference.jsonl", 0, 300),
        "mixed_math": _head_jsonl(train_jsonl, d / "mixed_math.jsonl", 300, 150),
        "heldout": _head_jsonl(data_file("gsm8k", "test.jsonl"), d / "heldout.jsonl", 0, 60),
        "shakespeare": d / "shakespeare.txt",
    }


@pytest.fixture(scope="session")
def stores(data_dir, tmp_path_factory) -> dict:
    """TokenStores sharing one BPE tokenizer trained on the reference corpus."""
    d = tmp_path_factory.mktemp("stores")
    math = dict(template=MATH_TEMPLATE, target_field="answer")
    ref = prepare(PrepareConfig([str(data_dir["reference"])], str(d / "reference"), train_tokenizer=512, **math),
                  progress=False)
    corpus = prepare(PrepareConfig([str(data_dir["mixed_math"]), str(data_dir["shakespeare"])], str(d / "corpus"),
                                   tokenizer=str(ref.path), template=MATH_TEMPLATE), progress=False)
    heldout = prepare(PrepareConfig([str(data_dir["heldout"])], str(d / "heldout"), tokenizer=str(ref.path), **math),
                      progress=False)
    return {"reference": ref, "corpus": corpus, "heldout": heldout}


@pytest.fixture(scope="session")
def reference_model(stores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "reference"
    train(TrainConfig(data=str(stores["reference"].path), out=str(out), model_preset="nano", seq_len=SEQ_LEN,
                      batch_size=8, max_tokens=40_000, lr=3e-3, warmup_steps=5), progress=False)
    return out / "final"


@pytest.fixture(scope="session")
def corpus_scores(stores, reference_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "corpus"
    return score(ScoreConfig(str(stores["corpus"].path), str(reference_model), str(out), SEQ_LEN, batch_size=16),
                 progress=False)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real full disk: a tmpfs of ``size`` mounted at ``path`` (needs root, as on this project's machines
    and CI; the test is skipped elsewhere)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
