"""Selection rules in every stage (a rule registered from Python included), and `rho1 export`: static
selection any trainer can use."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SEQ_LEN, read_metrics
from torch.utils.data import SequentialSampler
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from rho1.config import ExportConfig, SweepConfig, TrainConfig
from rho1.data.loader import WindowOrder, make_batch
from rho1.experiments.sweep import sweep
from rho1.export import export
from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
from rho1.model import build_model, load_model
from rho1.selection import RULES, register_rule, select_top, selective_loss
from rho1.train import train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def every_other_rule():
    """A rule of one's own: the top half by score, each kept token weighted 1 and its neighbours 0."""
    calls = []

    def rule(scores, valid, ratio, **options):
        calls.append(options)
        return select_top(scores, valid, max(1, int(valid.sum()) // 2)).float()

    register_rule("half", rule, "half of the tokens, whatever the ratio (a test rule)")
    yield calls
    del RULES["half"]


def test_a_registered_rule_trains_in_train_trainer_and_sweep(every_other_rule, stores, corpus_scores,
                                                            reference_model, tmp_path):
    common = dict(data=str(stores["corpus"].path), model_preset="nano", seq_len=SEQ_LEN, batch_size=4,
                  max_tokens=2048, scores=str(corpus_scores.path))
    train(TrainConfig(out=str(tmp_path / "run"), objective="slm", ratio=0.9, rule="half", **common), progress=False)
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(steps) == 8 and every_other_rule
    assert every_other_rule[0] == {"temperature": 0.25, "threshold": 0.0}
    assert all(r["frac_selected"] == pytest.approx(0.5, abs=0.01) for r in steps)  # the rule's, not --ratio's

    calls = len(every_other_rule)
    ds = windows_dataset(stores["corpus"], SEQ_LEN)[:8]
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = SelectiveTrainer(model=load_model(str(reference_model)), args=args, train_dataset=ds, ratio=0.9,
                               rule="half", data_collator=SelectiveCollator(stores["corpus"].tokenizer(),
                                                                          scores=corpus_scores))
    trainer.train()
    assert len(every_other_rule) > calls
    assert trainer.selection_stats["frac_selected"] == pytest.approx(0.5, abs=0.01)
    assert all(np.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)

    result = sweep(SweepConfig(train=TrainConfig(eval_data=[str(stores["heldout"].path)], **common),
                               ratios=[1.0], score_functions=["excess"], rules=["topk", "half"], ablation_ratio=0.5,
                               out=str(tmp_path / "sweep")), progress=False)
    assert set(result["runs"]) == {"clm", "ratio-0.5", "rule-half"}
    assert result["runs"]["rule-half"]["rule"] == "half"
    assert "<td>half</td>" in (tmp_path / "sweep" / "sweep.html").read_text()


def test_soft_and_threshold_runs_log_their_weights(stores, corpus_scores, tmp_path):
    common = dict(data=str(stores["corpus"].path), model_preset="nano", seq_len=SEQ_LEN, batch_size=4,
                  max_tokens=2048, scores=str(corpus_scores.path), objective="slm", ratio=0.5)
    train(TrainConfig(out=str(tmp_path / "soft"), rule="soft", temperature=0.5, **common), progress=False)
    steps = [r for r in read_metrics(tmp_path / "soft") if r["kind"] == "train"]
    assert all(r["weight_selected"] > 0.5 > r["weight_unselected"] > 0 for r in steps)
    assert all(0 < r["selected"] and np.isfinite(r["loss"]) for r in steps)
    train(TrainConfig(out=str(tmp_path / "threshold"), rule="threshold", threshold=1.0, **common), progress=False)
    steps = [r for r in read_metrics(tmp_path / "threshold") if r["kind"] == "train"]
    assert all(r["frac_selected"] <= 0.5 + 1e-9 for r in steps) and any(r["frac_selected"] < 0.49 for r in steps)
    assert all(r["excess_loss_selected"] > 1.0 for r in steps if r["frac_selected"] > 0)


def test_a_step_that_selects_nothing_does_not_move_the_weights(stores, corpus_scores, start_model, tmp_path):
    from rho1.train import setup, train_step

    cfg = TrainConfig(data=str(stores["corpus"].path), scores=str(corpus_scores.path), model=str(start_model),
                      out=str(tmp_path / "run"), objective="slm", rule="threshold", threshold=1e9, seq_len=SEQ_LEN,
                      batch_size=4, max_tokens=2 * 4 * SEQ_LEN)
    run = setup(cfg, progress=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    result = train_step(run, 0)
    run.held.close()
    assert result.selected == 0 and result.valid > 0 and result.score_range[1] < 1e9
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())  # no AdamW weight decay either
    # a whole run of such steps trains on nothing: it stops, and writes no final model
    with pytest.raises(ValueError, match="no token was selected in 2 steps in a row"):
        train(replace(cfg, out=str(tmp_path / "run2")), progress=False)
    assert not (tmp_path / "run2" / "final").exists()


def _rho1(*args):
    return subprocess.run([sys.executable, "-m", "rho1", *args], env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def start_model(stores, tmp_path_factory):
    path = tmp_path_factory.mktemp("start") / "model"
    store = stores["corpus"]
    build_model("nano", store.vocab_size, 2048, store.manifest["eos_token_id"], seed=0).save_pretrained(path)
    store.tokenizer().save_pretrained(path)
    return path


def test_export_labels_are_the_rules_selection(stores, corpus_scores, start_model, tmp_path):
    import datasets

    store = stores["corpus"]
    manifest = export(ExportConfig(data=str(store.path), scores=str(corpus_scores.path), model=str(start_model),
                                   out=str(tmp_path / "export"), seq_len=SEQ_LEN, batch_size=4, seed=3,
                                   shard_windows=16), progress=False)
    ds = datasets.load_from_disk(str(tmp_path / "export" / "dataset"))
    n_windows = store.num_windows(SEQ_LEN)
    assert len(ds) == n_windows == manifest["windows"] and len(manifest["shards"]) == -(-n_windows // 16)
    assert manifest["rule"] == "topk" and manifest["model"]["name"] == str(start_model)
    order = WindowOrder(n_windows, 3).take(0, n_windows)
    model = load_model(str(start_model))
    for group in (0, 1, n_windows // 4 - 1):  # the mask computed directly, from the full logits
        batch = make_batch(store, order[group * 4 : group * 4 + 4], SEQ_LEN, corpus_scores)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids).logits
        mask = selective_loss(logits, batch.labels, batch.ref_loss, 0.6).mask
        for row in range(4):
            rec = ds[group * 4 + row]
            n = len(rec["input_ids"])
            assert rec["input_ids"] == batch.input_ids[row, :n].tolist()
            labels = np.array(rec["labels"])
            assert labels[0] == -100
            np.testing.assert_array_equal(labels[1:] != -100, mask[row, : n - 1].numpy())
            np.testing.assert_array_equal(labels[1:][labels[1:] != -100], np.array(rec["input_ids"][1:])[mask[row, : n - 1].numpy()])
    kept = sum(int((np.array(r) != -100).sum()) for r in ds["labels"])
    assert kept == manifest["tokens_with_a_label"]
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "export" / "parquet")
    assert table.num_rows == n_windows and table.column_names == ["input_ids", "labels", "offset"]
    assert table.column("offset").to_pylist() == [int(w) * SEQ_LEN for w in order]  # each window's first token
    soft = export(ExportConfig(data=str(store.path), scores=str(corpus_scores.path), model=str(start_model),
                               out=str(tmp_path / "soft"), seq_len=SEQ_LEN, rule="soft", temperature=0.5),
                  progress=False)
    assert soft["columns"] == ["input_ids", "labels", "offset", "weights"]
    weights = datasets.load_from_disk(str(tmp_path / "soft" / "dataset"))[0]["weights"]
    assert weights[0] == 0 and 0 < max(weights) <= 1 and 0 < min(weights[1:]) < 0.5


class _InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def test_plain_trainer_on_the_export_matches_rho1_train_at_the_first_step(stores, corpus_scores, start_model, tmp_path):
    import datasets

    store = stores["corpus"]
    export(ExportConfig(data=str(store.path), scores=str(corpus_scores.path), model=str(start_model),
                        out=str(tmp_path / "export"), seq_len=SEQ_LEN, batch_size=4, seed=7), progress=False)
    train(TrainConfig(data=str(store.path), scores=str(corpus_scores.path), model=str(start_model),
                                out=str(tmp_path / "run"), objective="slm", ratio=0.6, seq_len=SEQ_LEN, batch_size=4,
                                seed=7, max_tokens=4 * SEQ_LEN, warmup_steps=0), progress=False)
    first = next(r for r in read_metrics(tmp_path / "run") if r["kind"] == "train")
    ds = datasets.load_from_disk(str(tmp_path / "export" / "dataset"))
    tokenizer = store.tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3)
    trainer = _InOrder(model=load_model(str(start_model)), args=args, train_dataset=ds,
                       data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    trainer.train()
    hf_loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    assert hf_loss == pytest.approx(first["loss"], rel=1e-3)  # the Trainer logs its loss rounded to 4 digits


def test_export_refuses_bad_input_in_one_sentence(stores, corpus_scores, start_model, tmp_path):
    store = stores["corpus"]
    base = ["export", "--data", str(store.path), "--scores", str(corpus_scores.path), "--model", str(start_model),
            "--seq-len", str(SEQ_LEN)]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    for extra, message in (
        (["--out", str(tmp_path / "taken")], "already exists; choose a new folder"),
        (["--out", str(tmp_path / "a"), "--ratio", "1.5"], "selection ratio must be in (0, 1]"),
        (["--out", str(tmp_path / "b"), "--rule", "soft", "--temperature", "-1"], "--temperature must be a positive"),
        (["--out", str(tmp_path / "c"), "--data", str(stores["heldout"].path)], "scores"),
    ):
        result = _rho1(*base, *extra)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    (tmp_path / "d.partial").mkdir()  # not ours: never removed
    (tmp_path / "d.partial" / "data.bin").write_text("x")
    result = _rho1(*base, "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "was not left by `rho1 export`" in result.stderr
    assert (tmp_path / "d.partial" / "data.bin").read_text() == "x"
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))
