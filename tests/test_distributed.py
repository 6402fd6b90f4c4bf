"""Several processes (torchrun, gloo on CPU) and runs killed halfway, compared bitwise with one plain run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, SEQ_LEN, read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rho1", *args]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def score_args(stores, model, out, chunk=4):
    return ["score", "--data", str(stores["corpus"].path), "--model", str(model), "--out", str(out),
            "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--chunk-windows", str(chunk)]


def test_two_process_scoring_equals_one_process_bitwise(stores, reference_model, tmp_path):
    torchrun(1, *score_args(stores, reference_model, tmp_path / "one"))
    torchrun(2, *score_args(stores, reference_model, tmp_path / "two"))
    one = (tmp_path / "one" / "scores.bin").read_bytes()
    assert one == (tmp_path / "two" / "scores.bin").read_bytes()
    assert np.isfinite(np.frombuffer(one, np.float16)).mean() > 0.9


def test_scoring_killed_halfway_resumes_to_the_same_bytes(stores, reference_model, tmp_path):
    torchrun(1, *score_args(stores, reference_model, tmp_path / "whole", chunk=2))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rho1", *score_args(stores, reference_model, out, chunk=2)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        progress = out / "progress"
        if progress.is_dir() and len(list(progress.iterdir())) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len([p for p in (out / "progress").iterdir() if p.name.isdigit()])
    manifest = (out / "manifest.json").read_text()
    assert '"complete": false' in manifest, "the run finished before it was killed: nothing was tested"
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    assert (out / "scores.bin").read_bytes() == (tmp_path / "whole" / "scores.bin").read_bytes()
    assert n_done >= 5


def test_scores_of_another_job_in_the_same_folder_are_refused(stores, reference_model, corpus_scores, tmp_path):
    from rho1.score import ScoreConfig, score

    with pytest.raises(ValueError, match="holds scores of another job .*seq_len"):
        score(ScoreConfig(str(stores["corpus"].path), str(reference_model), str(corpus_scores.path), SEQ_LEN // 2),
              progress=False)


def test_global_selection_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    import torch
    from dist_selection_worker import global_batch

    from rho1.selection import select_from_token_loss

    worker = str(ROOT / "tests" / "dist_selection_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker,
           str(tmp_path / "mask")]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    token_loss, labels, ref = global_batch()
    for score in ("excess", "random"):
        got = torch.load(tmp_path / f"mask.{score}.pt")
        one = select_from_token_loss(token_loss, labels, ref, 0.37, score, generator=torch.Generator().manual_seed(3))
        assert torch.equal(got["mask"], one.mask)
        assert torch.allclose(got["loss"], one.loss)


def _train_args(stores, scores, out, batch, **extra):
    args = ["train", "--data", str(stores["corpus"].path), "--out", str(out), "--model-preset", "nano",
            "--seq-len", str(SEQ_LEN), "--batch-size", str(batch), "--max-tokens", "8192", "--lr", "3e-3",
            "--warmup-steps", "3", "--log-every", "1", "--seed", "5"]
    if scores is not None:
        args += ["--objective", "slm", "--scores", str(scores.path), "--selection-scope", "global"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.parametrize("objective", ["clm", "slm"])
def test_two_rank_ddp_reproduces_one_process_with_twice_the_batch(stores, corpus_scores, tmp_path, objective):
    scores = corpus_scores if objective == "slm" else None
    torchrun(1, *_train_args(stores, scores, tmp_path / "one", batch=8))
    torchrun(2, *_train_args(stores, scores, tmp_path / "two", batch=4))
    one = [r["loss"] for r in read_metrics(tmp_path / "one") if r["kind"] == "train"]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if r["kind"] == "train"]
    assert len(one) == len(two) == 16
    assert two == pytest.approx(one, rel=1e-4)
