"""Trust in the basics: bad input gets one sentence and exit 2 with nothing written or destroyed, the CLI
answers before importing torch, Ctrl-C says how to continue, logs are readable in files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SEQ_LEN, read_metrics

from rho1.cli import main
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import TokenStore

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def one_sentence(capsys, *needles: str) -> str:
    """The error printed by the last main() call: one line, holding every needle."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> dict:
    """Every file under ``path`` with its bytes (what a refused command must leave as it was)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write to: a read-only tmpfs as root (as on CI), else a folder without write bits."""
    d = tmp_path / "readonly"
    d.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
        yield d
        subprocess.run(["umount", str(d)], check=True)
    else:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)


# ---- a CLI that answers at once ----


# ---- nothing overwritten or lost ----

def test_prepare_never_replaces_a_file_and_replaces_a_store_only_with_overwrite(data_dir, tmp_path, capsys):
    args = ["prepare", str(data_dir["heldout"]), "--text-field", "question", "--train-tokenizer", "300"]
    precious = tmp_path / "notes.txt"
    precious.write_text("do not delete me")
    assert main([*args, "--out", str(precious)]) == 2
    one_sentence(capsys, "is an existing file", "never replaces a file")
    assert precious.read_text() == "do not delete me"
    assert main([*args, "--out", str(precious), "--overwrite"]) == 2  # not even with --overwrite
    one_sentence(capsys, "is an existing file")
    assert precious.read_text() == "do not delete me"

    store = tmp_path / "store"
    assert main([*args, "--out", str(store)]) == 0
    capsys.readouterr()
    before = tree(store)
    assert main([*args[:-2], "--train-tokenizer", "320", "--out", str(store)]) == 2
    one_sentence(capsys, "already holds a TokenStore", "--overwrite")
    assert tree(store) == before
    assert main([*args[:-2], "--train-tokenizer", "320", "--out", str(store), "--overwrite"]) == 0
    capsys.readouterr()
    assert TokenStore.open(store).manifest["tokenizer"]["name"] == "bpe-320"

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main([*args, "--out", str(other)]) == 2
    one_sentence(capsys, "holds other files")
    assert tree(other) == {"keep.txt": b"x"}


def test_out_that_is_a_file_or_not_writable_is_one_sentence(stores, reference_model, readonly_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    data = str(stores["corpus"].path)
    cases = {
        "score": ["score", "--data", data, "--model", str(reference_model), "--seq-len", str(SEQ_LEN)],
        "train": ["train", "--data", data, "--model-preset", "nano", "--seq-len", str(SEQ_LEN), "--max-tokens", "512"],
        "dynamics": ["dynamics", str(reference_model.parent), "--data", str(stores["heldout"].path)],
    }
    for name, args in cases.items():
        assert main([*args, "--out", str(a_file)]) == 2, name
        one_sentence(capsys, "is an existing file")
        assert main([*args, "--out", str(a_file / "sub")]) == 2, name
        one_sentence(capsys, "is a file, not a folder")
        assert main([*args, "--out", str(readonly_dir / "out")]) == 2, name
        one_sentence(capsys, "cannot be written", "choose a folder you can write to")
    assert a_file.read_text() == "x"
    assert main(["report", str(reference_model.parent), "--out", str(readonly_dir / "r.html")]) == 2
    one_sentence(capsys, "cannot be written")


# ---- one sentence, exit 2, nothing half-written ----

def test_models_that_are_not_models_are_named(stores, reference_model, tmp_path, capsys):
    data = ["--data", str(stores["corpus"].path), "--seq-len", str(SEQ_LEN), "--out", str(tmp_path / "s")]
    run = reference_model.parent
    assert main(["score", "--model", "/nonexistent/model", *data]) == 2
    one_sentence(capsys, "model /nonexistent/model does not exist")
    assert main(["score", "--model", str(run), *data]) == 2
    one_sentence(capsys, f"{run} is a run folder; its model is {run / 'final'}")
    assert main(["score", "--model", str(stores["corpus"].path), *data]) == 2
    one_sentence(capsys, "is a TokenStore, not a model")
    assert main(["train", "--data", str(stores["corpus"].path), "--model", str(run), "--out",
                 str(tmp_path / "t")]) == 2
    one_sentence(capsys, "is a run folder")
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_hub_name_without_network_is_one_sentence_at_once(stores, tmp_path):
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "rho1", "score", "--data", str(stores["corpus"].path), "--model",
                             "nobody-here/no-such-model", "--out", str(tmp_path / "s")], capture_output=True,
                            text=True, env=ENV)  # HF_HUB_OFFLINE=1: no request leaves the machine
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0], result.stderr
    assert time.time() - start < 20  # no retries against an unreachable hub (the import of torch takes most)


def test_config_files_bad_yaml_bad_values_and_option_spelling(stores, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\nratio: 0.5\n")
    assert main(["train", "--config", str(bad)]) == 2
    one_sentence(capsys, "is not valid YAML at line")
    bad.write_text(f"data: {stores['corpus'].path}\nratio: abc\n")
    assert main(["train", "--config", str(bad)]) == 2
    one_sentence(capsys, "ratio must be a number, got 'abc'")
    bad.write_text(f"data: {stores['corpus'].path}\nseq_len: 6.5\n")
    assert main(["train", "--config", str(bad)]) == 2
    one_sentence(capsys, "seq_len must be a whole number")
    bad.write_bytes(b"data: \xff\xfe\n")
    assert main(["train", "--config", str(bad)]) == 2
    one_sentence(capsys, "is not UTF-8")
    good = tmp_path / "good.yaml"  # keys written as the options are, and a number with underscores
    good.write_text(f"data: {stores['corpus'].path}\nmodel-preset: nano\nseq-len: {SEQ_LEN}\nbatch_size: 4\n"
                    f"max-tokens: 1_024\nout: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(good)]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "model_preset: nano" in saved and "max_tokens: 1024" in saved


def test_degenerate_sizes_are_refused_before_anything_is_written(stores, reference_model, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(stores["corpus"].path), "--seq-len", "1", "--out", str(run)]) == 2
    one_sentence(capsys, "--seq-len must be at least 2")
    assert main(["score", "--data", str(stores["corpus"].path), "--model", str(reference_model), "--batch-size", "0",
                 "--out", str(tmp_path / "scores")]) == 2
    one_sentence(capsys, "--batch-size must be positive, got 0")
    assert not run.exists() and not (tmp_path / "scores").exists()


def messages(stderr: str) -> list[str]:
    """stderr without the progress lines of `train` and `score`."""
    return [line for line in stderr.strip().splitlines() if not line.startswith(("train ", "score:"))]


def _interrupt_when(cmd: list[str], ready, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "rho1", *cmd], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the command ended before it could be interrupted: nothing was tested"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_says_how_to_continue_and_the_rerun_finishes(stores, reference_model, tmp_path):
    run = tmp_path / "run"
    train_args = ["train", "--data", str(stores["corpus"].path), "--model-preset", "nano", "--seq-len", str(SEQ_LEN),
                  "--batch-size", "4", "--max-tokens", "200000", "--save-every", "1024", "--out", str(run)]
    result = _interrupt_when(train_args, lambda: any(p.name.isdigit() for p in (run / "checkpoints").glob("*")))
    assert result.returncode == 130
    lines = messages(result.stderr)
    assert len(lines) == 1 and "rho1 train: interrupted at step" in lines[0] and "--resume" in lines[0], result.stderr
    assert "Traceback" not in result.stderr

    scores = tmp_path / "scores"
    score_args = ["score", "--data", str(stores["corpus"].path), "--model", str(reference_model), "--seq-len",
                  str(SEQ_LEN), "--batch-size", "1", "--chunk-windows", "1", "--out", str(scores)]
    result = _interrupt_when(score_args, lambda: sum(p.name.isdigit() for p in (scores / "progress").glob("*")) >= 2)
    assert result.returncode == 130
    lines = messages(result.stderr)
    assert len(lines) == 1 and "chunks of" in lines[0] and "run the same command again" in lines[0], result.stderr
    finished = subprocess.run([sys.executable, "-m", "rho1", *score_args], env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert json.loads((scores / "manifest.json").read_text())["complete"]


def test_selective_trainer_without_reference_losses_is_refused_when_built(stores, reference_model, tmp_path):
    from transformers import TrainingArguments

    from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
    from rho1.model import load_model

    tokenizer = stores["corpus"].tokenizer()
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True)
    data = windows_dataset(stores["corpus"], SEQ_LEN)[:4]
    with pytest.raises(ValueError, match="needs reference losses: pass reference_model=MODEL"):
        SelectiveTrainer(model=load_model(str(reference_model)), args=args, train_dataset=data,
                         data_collator=SelectiveCollator(tokenizer), ratio=0.6)
    # at ratio 1, or with a score that needs no reference, there is nothing to refuse
    SelectiveTrainer(model=load_model(str(reference_model)), args=args, train_dataset=data,
                     data_collator=SelectiveCollator(tokenizer), ratio=0.6, score="random")


def test_checkpoint_errors_say_what_happened(stores, tmp_path, monkeypatch):
    import rho1.train as train_module
    import rho1.train.checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("the serializer broke")

    monkeypatch.setattr(rho1.train.checkpoint, "save_checkpoint", broken)
    cfg = train_module.TrainConfig(data=str(stores["reference"].path), out=str(tmp_path / "run"), model_preset="nano",
                                   seq_len=SEQ_LEN, batch_size=4, max_tokens=4096, save_every=1024)
    with pytest.raises(OSError, match=r"could not write checkpoint .*1024 \(RuntimeError: the serializer broke\); "
                                      r"no earlier checkpoint exists") as caught:
        train_module.train(cfg, progress=False)
    assert "disk" not in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)  # the cause is kept
    assert not (tmp_path / "run" / "checkpoints" / "1024.partial").exists()


# ---- the README's own example ----

def test_template_newlines_written_in_a_shell_are_newlines(data_dir, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["prepare", str(data_dir["heldout"]), "--template", r"Question: {question}\nAnswer:\t{answer}",
                 "--target-field", "answer", "--train-tokenizer", "300", "--out", str(out)]) == 0
    store = TokenStore.open(out)
    first = json.loads(data_dir["heldout"].read_text().splitlines()[0])
    ends = store.doc_offsets
    text = store.tokenizer().decode(np.asarray(store.tokens[ends[0] : ends[1] - 1]).tolist())
    assert text == f"Question: {first['question']}\nAnswer:\t{first['answer']}"
    assert store.manifest["template"] == "Question: {question}\nAnswer:\t{answer}"
    escaped = prepare(PrepareConfig([str(data_dir["heldout"])], str(tmp_path / "lit"), template=r"{question}\\n",
                                    text_field=None, train_tokenizer=300), progress=False)
    assert escaped.manifest["template"] == "{question}\\n"  # a written \\n stays a backslash and an n


# ---- readable logs ----

def test_progress_in_a_file_is_plain_lines_and_no_shared_tensor_warning(stores, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "rho1", "train", "--data", str(stores["corpus"].path),
                             "--model-preset", "nano", "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--max-tokens",
                             "8192", "--save-every", "2048", "--out", str(out)], env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr  # a pipe gets lines, not carriage-return updates
    bar_lines = [line for line in result.stderr.splitlines() if line.startswith("train clm")]
    assert 1 <= len(bar_lines) <= 4, result.stderr
    assert "Removed shared tensor" not in result.stderr + result.stdout
    assert len(list((out / "checkpoints").iterdir())) == 3


# ---- correctness ----

def test_eval_reads_its_config_and_checks_the_scores_window(stores, reference_model, corpus_scores, tmp_path,
                                                            capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {reference_model}\ndata: [{stores['corpus'].path}]\nscores: [{corpus_scores.path}]\n"
                      "ratio: 0.5\n")
    assert main(["eval", "--config", str(config)]) == 0  # seq_len: the ScoreStore's
    result = json.loads(capsys.readouterr().out)["corpus"]
    assert result["tokens"] == int(np.isfinite(corpus_scores.scores).sum())
    assert {"selected_loss", "unselected_loss", "ref_loss"} <= set(result)
    assert main(["eval", "--config", str(config), "--seq-len", "32"]) == 2
    one_sentence(capsys, f"use windows of {SEQ_LEN} tokens but --seq-len is 32")
    assert main(["view", "--data", str(stores["corpus"].path), "--model", str(reference_model), "--scores",
                 str(corpus_scores.path), "--seq-len", "32", "--out", str(tmp_path / "v.html")]) == 2
    one_sentence(capsys, "--seq-len is 32")
    assert not (tmp_path / "v.html").exists()


def test_scoring_the_same_store_spelled_differently_is_the_same_job(stores, reference_model, tmp_path, monkeypatch):
    from rho1.score import ScoreConfig, score

    out = tmp_path / "scores"
    first = score(ScoreConfig(str(stores["heldout"].path), str(reference_model), str(out), SEQ_LEN), progress=False)
    monkeypatch.chdir(stores["heldout"].path.parent)
    again = score(ScoreConfig(os.path.relpath(stores["heldout"].path), os.path.relpath(reference_model),
                              os.path.relpath(out), SEQ_LEN), progress=False)
    assert np.array_equal(np.asarray(first.scores), np.asarray(again.scores), equal_nan=True)
    assert Path(again.manifest["token_store"]).is_absolute()


def test_log_every_averages_loss_and_grad_norm_over_its_steps(stores, tmp_path):
    from rho1.train import TrainConfig, train

    kw = dict(data=str(stores["corpus"].path), model_preset="nano", seq_len=SEQ_LEN, batch_size=4, max_tokens=2048,
              warmup_steps=2)
    train(TrainConfig(out=str(tmp_path / "every"), log_every=1, **kw), progress=False)
    train(TrainConfig(out=str(tmp_path / "pairs"), log_every=2, **kw), progress=False)
    every = [r for r in read_metrics(tmp_path / "every") if r["kind"] == "train"]
    pairs = [r for r in read_metrics(tmp_path / "pairs") if r["kind"] == "train"]
    assert len(every) == 8 and [r["step"] for r in pairs] == [2, 4, 6, 8]
    for i, r in enumerate(pairs):  # the loss over every token of both steps; the grad norm, their mean
        a, b = every[2 * i], every[2 * i + 1]
        assert r["selected"] == a["selected"] + b["selected"]
        assert r["loss"] == pytest.approx((a["loss"] * a["selected"] + b["loss"] * b["selected"]) / r["selected"],
                                          rel=1e-5)
        assert r["grad_norm"] == pytest.approx((a["grad_norm"] + b["grad_norm"]) / 2, rel=1e-5)


def test_resume_without_a_checkpoint_recomputes_the_heldout_split(stores, reference_model, tmp_path, capsys):
    from rho1.train import TrainConfig, train

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("stale: true\n")
    stale = np.zeros(stores["heldout"].n_tokens, dtype=bool)
    np.save(out / "eval_selection_0.npy", stale)
    train(TrainConfig(data=str(stores["corpus"].path), out=str(out), model_preset="nano", seq_len=SEQ_LEN,
                      batch_size=4, max_tokens=1024, eval_data=[str(stores["heldout"].path)],
                      reference=str(reference_model), eval_max_windows=4, resume=True), progress=True)
    assert "no checkpoint in" in capsys.readouterr().out
    fresh = np.load(out / "eval_selection_0.npy")
    assert fresh.any() and not np.array_equal(fresh, stale)


def test_online_reference_is_loaded_in_the_compute_dtype(stores, reference_model, tmp_path, monkeypatch):
    import rho1.model
    import rho1.train as train_module
    import rho1.train.build

    dtypes = []
    real = rho1.train.build.load_model

    def recording(name, trust_remote_code=False, dtype=None, **options):
        dtypes.append(dtype)
        return real(name, trust_remote_code, dtype, **options)

    monkeypatch.setattr(rho1.train.build, "load_model", recording)
    monkeypatch.setattr(rho1.model, "load_model", recording)  # rho1.align.load_reference loads the reference
    train_module.train(train_module.TrainConfig(
        data=str(stores["corpus"].path), out=str(tmp_path / "run"), objective="slm", reference=str(reference_model),
        model=str(reference_model), seq_len=SEQ_LEN, batch_size=2, max_tokens=256, precision="bf16"), progress=False)
    assert dtypes == [None, torch.bfloat16]  # the learner keeps float32 master weights; the frozen reference not


def test_dynamics_says_what_it_covers_and_warns_about_pruned_checkpoints(stores, tmp_path, capsys):
    from rho1.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(data=str(stores["corpus"].path), out=str(run), model_preset="nano", seq_len=SEQ_LEN,
                      batch_size=4, max_tokens=4096, save_every=512, keep_last=2), progress=False)
    assert main(["dynamics", str(run), "--data", str(stores["heldout"].path), "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 of" in out and "held-out windows" in out and "(--max-windows 0 for all)" in out
    assert "warning" in out and "--keep-last 0" in out and "5 earlier ones were deleted" in out


