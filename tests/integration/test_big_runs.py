"""What a GPU run needs, tested on CPU: activation checkpointing, attention kernels, torch.compile,
experiment trackers, throughput and MFU, a lazy dataset, and the prepared GPU check at a tiny size."""

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SEQ_LEN, read_metrics

from rho1.cli import main
from rho1.train import TrainConfig, setup, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _cfg(stores, scores, out, **kw) -> TrainConfig:
    options = dict(data=str(stores["corpus"].path), scores=str(scores.path), objective="slm", ratio=0.6,
                   model_preset="nano", seq_len=SEQ_LEN, batch_size=4, max_tokens=5 * 4 * SEQ_LEN, warmup_steps=2,
                   out=str(out))
    return TrainConfig(**{**options, **kw})


def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]


def test_gradient_checkpointing_trains_the_same(stores, corpus_scores, tmp_path):
    plain = _cfg(stores, corpus_scores, tmp_path / "plain")
    train(plain, progress=False)
    checkpointed = replace(plain, out=str(tmp_path / "ckpt"), gradient_checkpointing=True)
    summary = train(checkpointed, progress=False)
    np.testing.assert_allclose(_losses(tmp_path / "ckpt"), _losses(tmp_path / "plain"), rtol=1e-5)
    assert summary["gradient_checkpointing"] is True and summary["loss_path"] == "chunked"
    run = setup(replace(checkpointed, out=str(tmp_path / "again")), progress=False)
    assert run.accelerator.unwrap_model(run.model).is_gradient_checkpointing
    run.held.close()


def test_attention_implementation_is_used_and_recorded(stores, corpus_scores, tmp_path, capsys):
    sdpa = train(_cfg(stores, corpus_scores, tmp_path / "sdpa"), progress=False)
    eager = train(_cfg(stores, corpus_scores, tmp_path / "eager", attn_implementation="eager"), progress=False)
    assert (sdpa["attn_implementation"], eager["attn_implementation"]) == ("sdpa", "eager")
    np.testing.assert_allclose(_losses(tmp_path / "eager"), _losses(tmp_path / "sdpa"), rtol=1e-4)
    assert main(["train", "--data", str(stores["corpus"].path), "--attn-implementation", "flash_attention_2",
                 "--out", str(tmp_path / "fa")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flash_attention_2 needs a CUDA GPU; use sdpa" in err[0], err


def test_torch_compile_keeps_the_losses(stores, corpus_scores, tmp_path):
    eager = _cfg(stores, corpus_scores, tmp_path / "eager", max_tokens=3 * 4 * SEQ_LEN)
    train(eager, progress=False)
    summary = train(replace(eager, out=str(tmp_path / "compiled"), torch_compile=True), progress=False)
    assert summary["torch_compile"] is True
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-3)


def test_mfu_and_throughput_in_every_record_and_the_summary(stores, corpus_scores, tmp_path, capsys):
    summary = train(_cfg(stores, corpus_scores, tmp_path / "run"), progress=False)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(records) == 5
    for record in records:
        assert 0 < record["mfu"] <= 1 and record["tokens_per_second_per_process"] > 0
    assert 0 < summary["mfu"] <= 1 and summary["mfu_not_shown"] is None
    assert "FLOPs/cycle" in summary["peak_flops_from"] and "/proc/cpuinfo" in summary["peak_flops_from"]
    assert summary["flops_per_token"] > 6 * 0.9 * summary["parameters"] - 6 * 32 * stores["corpus"].vocab_size
    # --peak-flops decides: the model FLOPs per second over it (clm: every token's head backward counts but the
    # last of each window's, which has no next token)
    fixed = train(_cfg(stores, corpus_scores, tmp_path / "fixed", objective="clm", peak_flops=1e12), progress=False)
    assert fixed["peak_flops_from"] == "--peak-flops"
    assert fixed["mfu"] == pytest.approx(fixed["tokens_per_second_per_process"] * fixed["flops_per_token"] / 1e12,
                                         rel=1 / SEQ_LEN)
    # a peak below what the run did is wrong: no MFU above 1 is ever printed or logged, the reason is
    args = ["train", "--data", str(stores["corpus"].path), "--model-preset", "nano", "--seq-len", str(SEQ_LEN),
            "--batch-size", "4", "--max-tokens", str(3 * 4 * SEQ_LEN), "--peak-flops", "1e6", "--out",
            str(tmp_path / "low")]
    assert main(args) == 0
    low = json.loads((tmp_path / "low" / "summary.json").read_text())
    assert low["mfu"] is None and "above the peak of 1 MFLOP/s (--peak-flops)" in low["mfu_not_shown"]
    assert all(r["mfu"] is None for r in read_metrics(tmp_path / "low") if r["kind"] == "train")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "MFU not shown: the model's FLOPs ran at" in last and "%" not in last.split("MFU")[1], last


def test_trackers_get_the_metrics_and_the_config_offline(stores, corpus_scores, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder, no database server
    out = tmp_path / "run"
    train(_cfg(stores, corpus_scores, out, report_to=["tensorboard", "wandb", "mlflow"]), progress=False)
    losses = _losses(out)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "trackers" / "run"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    assert {"mfu", "frac_selected", "lr"} <= set(events.Tags()["scalars"])

    import mlflow

    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert [m.value for m in client.get_metric_history(found.info.run_id, "loss")] == pytest.approx(losses, rel=1e-6)
    assert found.data.params["ratio"] == "0.6" and found.data.params["objective"] == "slm"

    (wandb_run,) = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))  # what `wandb sync` uploads later
    records = wandb_run.read_bytes()
    assert all(json.dumps(loss).encode() in records for loss in losses)  # each logged value, as W&B's JSON
    assert b"frac_selected" in records and b'"slm"' in records  # a metric's name; the config's objective

    assert main(["train", "--data", str(stores["corpus"].path), "--report-to", "trackio", "--out",
                 str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report-to trackio needs the trackio package: pip install 'rho1[trackio]'" in err[0]


def test_windows_dataset_is_lazy_picklable_and_the_same_windows(stores):
    from torch.utils.data import DataLoader

    from rho1.hf import windows_dataset

    store = stores["corpus"]
    dataset = windows_dataset(store, SEQ_LEN)
    today = [{"input_ids": store.tokens[w * SEQ_LEN : (w + 1) * SEQ_LEN].astype(np.int64).tolist(),
              "offset": w * SEQ_LEN} for w in range(store.num_windows(SEQ_LEN))]
    assert len(dataset) == len(today) and [dataset[i] for i in range(len(dataset))] == today
    assert dataset[-1] == today[-1] and dataset[2:5] == today[2:5]
    with pytest.raises(IndexError):
        dataset[len(today)]
    blob = pickle.dumps(dataset)
    assert len(blob) < 1000  # the path, not the tokens
    assert pickle.loads(blob)[7] == today[7]
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert [example["offset"] for example in loader] == [e["offset"] for e in today]


def test_datasets_stays_out_of_training_and_scoring():
    # (rho1.hf imports transformers.Trainer, which imports datasets where it is installed: that is transformers')
    code = ("import sys, rho1.train, rho1.score, rho1.cli; "
            "rho1.cli.main(['train', '--data', 'nowhere']); print('datasets' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_the_gpu_check_runs_at_a_tiny_size_on_cpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--no-compile", "--out",
                             str(tmp_path / "check")], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) >= 8, result.stdout
    ratios = {row.split(" | ")[0][2:]: row.rstrip(" |").split(" | ")[-1] for row in rows}
    assert float(ratios["SLM loss, chunked / full logits (bf16)"]) == pytest.approx(1.0, abs=1e-2)
    assert float(ratios["SLM first-step loss, online reference / stored scores"]) == pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "check" / "slm" / "summary.json").read_text())["mfu"] > 0
    assert Path(tmp_path / "check" / "scores" / "manifest.json").is_file()
    scoring = [v for k, v in ratios.items() if "`rho1 score` / the full-logits loop" in k]
    assert len(scoring) == 1 and float(scoring[0]) > 0  # rho1 score beside the plain loop, both with an MFU
