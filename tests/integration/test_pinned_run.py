"""Behaviour pinned across refactors: the per-step losses and selection statistics of a fixed small CLM
and SLM run equal the ones recorded in tests/data/pinned/runs.json (rel 1e-5).

Regenerate (only when a change of behaviour is intended, and say so in the commit):
    RHO1_PIN_WRITE=1 .venv/bin/python -m pytest tests/test_pinned_run.py
"""

import json
import os

import pytest
import torch
from conftest import ROOT, SEQ_LEN, read_metrics

from rho1.model import build_model
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

PINNED = ROOT / "tests" / "data" / "pinned" / "runs.json"
KEYS = ("loss", "selected", "frac_selected", "learner_loss_selected", "excess_loss_selected",
        "excess_loss_unselected", "grad_norm")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # summation order, and so the last bits, depend on the thread count
    yield
    torch.set_num_threads(before)


def test_clm_and_slm_steps_are_pinned(stores, tmp_path, one_thread):
    store = stores["corpus"]
    reference = tmp_path / "reference"  # a fixed untrained model: its losses only need to be reproducible
    build_model("nano", store.vocab_size, 2048, store.manifest["eos_token_id"], seed=123).save_pretrained(reference)
    store.tokenizer().save_pretrained(reference)
    scores = score(ScoreConfig(str(store.path), str(reference), str(tmp_path / "scores"), SEQ_LEN, batch_size=8),
                   progress=False)
    common = dict(data=str(store.path), model_preset="nano", seq_len=SEQ_LEN, batch_size=4, grad_accum=2,
                  max_tokens=20 * 8 * SEQ_LEN, lr=3e-3, warmup_steps=3, scores=str(scores.path))
    runs = {}
    for name, kw in {"clm": dict(objective="clm"), "slm": dict(objective="slm", ratio=0.6)}.items():
        train(TrainConfig(out=str(tmp_path / name), **common, **kw), progress=False)
        runs[name] = [{k: r.get(k) for k in KEYS} for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
    if os.environ.get("RHO1_PIN_WRITE"):
        PINNED.write_text(json.dumps(runs, indent=1))
    pinned = json.loads(PINNED.read_text())
    for name in ("clm", "slm"):
        assert len(runs[name]) == len(pinned[name]) == 20
        for step, (got, want) in enumerate(zip(runs[name], pinned[name])):
            for key in KEYS:
                if want.get(key) is None:
                    assert got.get(key) is None, (name, step, key)
                else:
                    assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key)
