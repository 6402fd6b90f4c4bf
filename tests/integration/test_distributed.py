"""Several processes (torchrun, gloo on CPU) and runs killed halfway, compared bitwise with one plain run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import ROOT, SEQ_LEN, read_metrics, small_disk

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


DDP, FSDP2 = (str(ROOT / "configs" / "accelerate" / name) for name in ("ddp.yaml", "fsdp2.yaml"))


def torchrun(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "rho1", *args]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def accelerate_cmd(config: str, *args: str) -> list[str]:
    """`accelerate launch --config_file CONFIG -m rho1 ARGS`, as the README runs it."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", "rho1", *args]


def accelerate_launch(config: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(accelerate_cmd(config, *args), env=ENV, capture_output=True, text=True, timeout=300)
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

    worker = str(ROOT / "tests" / "integration" / "dist_selection_worker.py")
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
            "--seq-len", str(SEQ_LEN), "--batch-size", str(batch), "--max-tokens", "10240", "--lr", "3e-3",
            "--warmup-steps", "3", "--log-every", "1", "--seed", "5", "--eval-data", str(stores["heldout"].path),
            "--eval-max-windows", "6", "--eval-every", "4096"]
    if scores is not None:
        args += ["--objective", "slm", "--scores", str(scores.path), "--selection-scope", "global"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.mark.parametrize("objective", ["clm", "slm", "slm-micro"])
def test_two_rank_ddp_and_fsdp2_reproduce_one_process_with_twice_the_batch(stores, corpus_scores, tmp_path,
                                                                            objective):
    """20 optimizer steps: one process with 8 windows a step (torchrun), two DDP ranks and two FSDP2 ranks
    (accelerate launch with configs/accelerate/ddp.yaml and fsdp2.yaml) with 4 each; the FSDP2 run writes a whole Hugging
    Face folder. With the micro scope each rank ranks its own windows, which one process cannot reproduce:
    FSDP2 is then compared with DDP."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    scores = corpus_scores if objective != "clm" else None
    scope = {"selection_scope": "micro"} if objective == "slm-micro" else {}
    accelerate_launch(DDP, *_train_args(stores, scores, tmp_path / "ddp", batch=4, **scope))
    accelerate_launch(FSDP2, *_train_args(stores, scores, tmp_path / "fsdp2", batch=4, **scope))
    if scope:
        (tmp_path / "one").symlink_to(tmp_path / "ddp")
    else:
        torchrun(1, *_train_args(stores, scores, tmp_path / "one", batch=8))
    runs = {name: read_metrics(tmp_path / name) for name in ("one", "ddp", "fsdp2")}
    losses = {name: [r["loss"] for r in m if r["kind"] == "train"] for name, m in runs.items()}
    selected = {name: [r["selected"] for r in m if r["kind"] == "train"] for name, m in runs.items()}
    evals = {name: [r["eval/heldout/loss"] for r in m if r["kind"] == "eval"] for name, m in runs.items()}
    assert len(losses["one"]) == 20 and len(evals["one"]) == 4
    for name in ("ddp", "fsdp2"):
        assert losses[name] == pytest.approx(losses["one"], rel=1e-4), name
        assert selected[name] == selected["one"], name
        assert evals[name] == pytest.approx(evals["one"], rel=1e-4), name
    summary = json.loads((tmp_path / "fsdp2" / "summary.json").read_text())
    assert summary["loss_path"] == "chunked"  # the loss from the head's input, with the head sharded
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    sharded = load_file(tmp_path / "fsdp2" / "final" / "model.safetensors")
    assert one.keys() == sharded.keys()
    for name, tensor in one.items():
        assert torch.allclose(sharded[name], tensor, rtol=1e-3, atol=1e-5), name
    assert "lm_head.weight" not in sharded  # tied weights stored once, as save_pretrained stores them
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "final")
    assert torch.equal(model.model.embed_tokens.weight, sharded["model.embed_tokens.weight"])


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sharded_selective_loss_equals_full_logits_on_two_ranks(tmp_path, precision):
    """Under FSDP2 the head weight is sharded by vocabulary rows outside the forward; the loss from the head's
    input (forward_selection) equals the full-logits path, and both equal one process on the whole batch: losses,
    selections and every whole gradient (fp32). In bf16 the loss stays float32 (FSDP2 does not cast it) and
    near the fp32 one."""
    import torch
    from fsdp_loss_worker import CASES, fresh_model, global_batch, one_step

    from rho1.selection import valid_mask

    worker = str(ROOT / "tests" / "integration" / "fsdp_loss_worker.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2, worker, str(tmp_path / "out.pt"),
           precision]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["processes"] == 2 and out["head_local_rows"] * 2 == out["head_rows"]
    ids, labels, ref = global_batch()
    n_valid = float(valid_mask(labels, ref).sum())
    model = fresh_model()
    for case, (ratio, rule) in CASES.items():
        whole = one_step(model, ids, labels, ref, ratio, rule, "logits", scale=1 / n_valid)
        expected = {name: p.grad for name, p in model.named_parameters()}
        for path in ("chunked", "logits"):
            got = out[f"{case}/{path}"]
            assert got["dtype"] == "torch.float32", (case, path)
            if precision == "bf16":
                assert float(got["loss"]) == pytest.approx(float(whole.loss_sum.detach()) / n_valid, rel=2e-2)
                continue
            assert float(got["loss"]) == pytest.approx(float(whole.loss_sum.detach()) / n_valid, rel=1e-5), (case, path)
            if rule == "topk":
                assert torch.equal(got["weights"], whole.weights), (case, path)
            else:
                assert torch.allclose(got["weights"], whole.weights, atol=1e-5), (case, path)
            assert got["grads"].keys() == expected.keys()
            for name, grad in expected.items():
                assert torch.allclose(got["grads"][name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max())), \
                    (case, path, name)


def _metrics_without_timing(run):
    timing = ("tokens_per_second", "tokens_per_second_per_process", "mfu")
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run)]


@pytest.mark.parametrize("launcher", ["one-process", "fsdp2"])
def test_training_killed_halfway_resumes_bitwise(stores, corpus_scores, tmp_path, launcher):
    """SIGKILL to the whole job (the launcher and every rank, as a scheduler kills it) after a checkpoint; the
    resumed run ends with the same weights, bit for bit, and the same metrics."""
    args = ["train", "--data", str(stores["corpus"].path), "--objective", "slm", "--scores", str(corpus_scores.path),
            "--model-preset", "nano", "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--grad-accum", "2",
            "--max-tokens", "30000", "--lr", "3e-3", "--warmup-steps", "3", "--save-every", "2048",
            "--keep-last", "2", "--eval-data", str(stores["heldout"].path), "--eval-every", "8192",
            "--eval-max-windows", "8", "--score", "random"]

    def command(out, *extra):
        full = [*args, "--out", str(out), *extra]
        return [sys.executable, "-m", "rho1", *full] if launcher == "one-process" else accelerate_cmd(FSDP2, *full)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command(whole), env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen(command(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "12288").is_dir():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it was killed: nothing was tested"
    result = subprocess.run(command(killed, "--resume"), env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert (killed / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    assert _metrics_without_timing(killed) == _metrics_without_timing(whole)
    assert len(list((killed / "checkpoints").iterdir())) == 2  # --keep-last 2


def test_corrupted_checkpoint_is_reported_before_resuming(stores, tmp_path):
    from rho1.train import TrainConfig, train

    cfg = TrainConfig(data=str(stores["corpus"].path), out=str(tmp_path / "run"), model_preset="nano",
                      seq_len=SEQ_LEN, batch_size=4, max_tokens=4096, save_every=1024, keep_last=5)
    train(cfg, progress=False)
    newest = tmp_path / "run" / "checkpoints" / "3072"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    cfg.resume = True
    with pytest.raises(ValueError, match=r"3072/model.safetensors does not match the hash in its manifest "
                                         r"\(corrupted or changed\); delete .*3072 to resume from the checkpoint before"):
        train(cfg, progress=False)


def _nan_model(tmp_path, stores):
    import torch

    from rho1.model import build_model

    model = build_model("nano", stores["corpus"].vocab_size, 2048, stores["corpus"].manifest["eos_token_id"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_model")
    return model


def test_nan_loss_stops_with_one_sentence_or_skips_under_the_flag(stores, tmp_path):
    import torch
    from safetensors.torch import load_file

    from rho1.train import TrainConfig, train

    _nan_model(tmp_path, stores)
    cfg = TrainConfig(data=str(stores["corpus"].path), out=str(tmp_path / "run"), model=str(tmp_path / "nan_model"),
                      seq_len=SEQ_LEN, batch_size=4, max_tokens=2048)
    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 0 .*the weights were not updated"):
        train(cfg, progress=False)
    cfg.skip_nonfinite = True
    train(cfg, progress=False)
    skipped = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "skipped"]
    assert len(skipped) == 2048 // (4 * SEQ_LEN)  # every step
    before = load_file(tmp_path / "nan_model" / "model.safetensors")
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for name, tensor in before.items():  # nothing was updated, the NaN did not spread
        assert torch.equal(torch.nan_to_num(tensor, nan=7.0), torch.nan_to_num(after[name], nan=7.0)), name


def test_disk_full_while_checkpointing_leaves_the_previous_checkpoint_intact(stores, tmp_path):
    from rho1.train import TrainConfig, read_training_state, train

    with small_disk(tmp_path / "disk", "1100k") as disk:
        cfg = TrainConfig(data=str(stores["reference"].path), out=str(disk / "run"), model_preset="nano",
                          seq_len=SEQ_LEN, batch_size=4, max_tokens=4096, save_every=1024, keep_last=10)
        with pytest.raises(OSError, match=r"could not write checkpoint .*/2048 .*the previous checkpoint .*/1024 is "
                                          r"intact: free space and rerun with --resume"):
            train(cfg, progress=False)
        state = read_training_state(disk / "run" / "checkpoints" / "1024")  # hashes verified
        assert state["tokens"] == 1024
        assert not (disk / "run" / "checkpoints" / "2048").exists()


def test_default_warmup_is_three_percent_of_the_steps_two_processes_take(stores, reference_model, tmp_path):
    """A pretrained --model warms up over 3% of the optimizer steps the run really takes: with 2 processes and
    gradient accumulation each step holds 2 x 2 batches, so 100 steps (not the 200 one process would take)."""
    out = tmp_path / "two"
    torchrun(2, "train", "--data", str(stores["corpus"].path), "--model", str(reference_model), "--out", str(out),
             "--seq-len", str(SEQ_LEN), "--batch-size", "1", "--grad-accum", "2", "--max-tokens", str(100 * 4 * SEQ_LEN),
             "--log-every", "1", "--threads", "1")
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert steps[-1] == 100 == json.loads((out / "summary.json").read_text())["steps"]
    assert config["warmup_steps"] == round(0.03 * steps[-1]) == 3
    lrs = [r["lr"] for r in read_metrics(out) if r["kind"] == "train"]
    assert lrs[2] == pytest.approx(config["lr"]) and lrs[0] == pytest.approx(config["lr"] / 3)  # warm by step 3
