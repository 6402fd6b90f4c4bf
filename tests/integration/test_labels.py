"""Per-source accounting: document labels survive prepare, score and train, and the logged share of each
source's tokens selected is a count of the selection masks."""

import json

import numpy as np
import pytest
import torch
from conftest import SEQ_LEN, data_file, read_metrics

from rho1.analysis.report import ReportConfig, build_report
from rho1.data.prepare import PrepareConfig, prepare
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, setup, train
from rho1.train.step import micro_step, step_batches

SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@pytest.fixture(scope="module")
def labelled(stores, reference_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("labelled")
    records = [{"text": f"Question: {r['question']}\nAnswer: {r['answer']}", "source": "gsm8k"}
               for r in map(json.loads, data_file("gsm8k", "train.jsonl").read_text().splitlines()[:60])]
    for r in map(json.loads, data_file("gsm8k", "example_model_solutions.jsonl").read_text().splitlines()[:20]):
        for solver in SOLVERS:
            if solver in r:
                right = "right" if r[solver]["is_correct"] else "wrong"
                records.append({"text": f"Question: {r['question']}\nAnswer: {r[solver]['solution']}",
                                "source": f"solution_{right}"})
    (d / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "prose.txt").write_text(data_file("tinyshakespeare", "input.txt").read_text()[:20_000])
    store = prepare(PrepareConfig([str(d / "mix.jsonl"), str(d / "prose.txt")], str(d / "store"),
                                  tokenizer=str(stores["corpus"].path), label_field="source"), progress=False)
    scores = score(ScoreConfig(str(store.path), str(reference_model), str(d / "scores"), SEQ_LEN, batch_size=16),
                   progress=False)
    return store, scores, records


def test_labels_survive_prepare_and_score(labelled):
    store, scores, records = labelled
    assert set(store.label_names) == {"gsm8k", "solution_wrong", "solution_right", "prose.txt"}
    expected = [r["source"] for r in records] + ["prose.txt"]
    assert [store.label_names[i] for i in store.doc_labels] == expected
    ends = store.doc_offsets
    positions = np.array([ends[0], ends[1] - 1, ends[1], ends[-1] - 1, -1])
    assert store.token_labels(positions).tolist() == [store.doc_labels[0], store.doc_labels[0], store.doc_labels[1],
                                                      store.doc_labels[-1], -1]
    assert scores.manifest["complete"] and store.verify()  # doc_labels.npy is hashed with the rest


def test_logged_shares_per_source_are_counts_of_the_selection(labelled, stores, tmp_path):
    store, scores, _ = labelled
    cfg = TrainConfig(data=str(store.path), scores=str(scores.path), objective="slm", ratio=0.5, model_preset="nano",
                      seq_len=SEQ_LEN, batch_size=4, grad_accum=2, max_tokens=6 * 8 * SEQ_LEN, log_every=1,
                      eval_data=[str(stores["heldout"].path)], eval_max_windows=2, out=str(tmp_path / "run"))
    train(cfg, progress=False)
    first = next(r for r in read_metrics(tmp_path / "run") if r["kind"] == "train")
    # the same first step, counted by hand from the masks
    run = setup(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "again")}), progress=False)
    valid_total = selected_total = 0
    per_label = np.zeros((len(store.label_names), 2))
    for m, batch in enumerate(step_batches(run, 0)):
        selection, _ = micro_step(run, batch, 0, m)
        valid = (batch.labels != -100) & torch.isfinite(batch.ref_loss)
        for i in range(len(store.label_names)):
            here = batch.label_ids == i
            per_label[i] += [int((valid & here).sum()), int((selection.mask & here).sum())]
        valid_total += int(valid.sum())
        selected_total += int(selection.mask.sum())
    run.log.close()
    for i, name in enumerate(store.label_names):
        assert first[f"label/{name}/tokens"] == per_label[i, 0]
        if per_label[i, 0]:
            assert first[f"label/{name}/frac_selected"] == pytest.approx(per_label[i, 1] / per_label[i, 0])
    assert first["selected"] == selected_total == sum(per_label[:, 1])
    html, _ = build_report(ReportConfig(runs=[str(tmp_path / "run")]))
    assert "share selected per source" in html
