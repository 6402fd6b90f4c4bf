"""Nothing lost, nothing silent: the failures that exit 0 with wrong results or lose data, each as
a user meets it: the command, its exit code, one sentence, and what is left on disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SEQ_LEN, small_disk

from rho1.cli import main
from rho1.data.store import ScoreStore, TokenStore, sha256_file
from rho1.lock import lock_path, write_lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def one_sentence(capsys, *needles: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith(("train", "score:", "Generating"))]  # progress lines
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert "Traceback" not in err[0]
    return err[0]


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_store(store: TokenStore, dst: Path) -> Path:
    shutil.copytree(store.path, dst)
    return dst


# ---- 1. a ScoreStore rebuilt in place, as the message advises, gets the same scores ----

def test_score_store_rebuilt_in_place_after_losing_its_manifest_has_the_same_scores(stores, reference_model, tmp_path,
                                                                                     capsys):
    out = tmp_path / "scores"
    args = ["score", "--data", str(stores["heldout"].path), "--model", str(reference_model), "--seq-len", str(SEQ_LEN),
            "--chunk-windows", "4", "--out", str(out)]
    assert main(args) == 0
    original = sha256_file(out / "scores.bin")
    (out / "manifest.json").unlink()
    assert main(["train", "--data", str(stores["heldout"].path), "--scores", str(out), "--objective", "slm",
                 "--out", str(tmp_path / "run")]) == 2
    one_sentence(capsys, "not a ScoreStore (no manifest.json)", "rho1 score")
    # the bytes go too (what the old markers claimed is no longer there): nothing may count as done
    (out / "scores.bin").write_bytes(b"\0" * (out / "scores.bin").stat().st_size)
    assert main(args) == 0
    assert "nothing left to score" not in capsys.readouterr().out
    assert sha256_file(out / "scores.bin") == original
    assert ScoreStore.open(out, stores["heldout"]).verify().manifest["mean_loss"] > 0.5


def test_markers_of_another_job_count_for_nothing(stores, reference_model, tmp_path):
    out = tmp_path / "scores"
    args = ["score", "--data", str(stores["heldout"].path), "--model", str(reference_model), "--chunk-windows", "4",
            "--out", str(out)]
    assert main([*args, "--seq-len", str(SEQ_LEN)]) == 0
    first = np.array(ScoreStore.open(out).scores)
    (out / "manifest.json").unlink()  # a lost manifest, then another job (other windows) into the same folder
    assert main([*args, "--seq-len", str(SEQ_LEN // 2)]) == 0
    second = ScoreStore.open(out, stores["heldout"])
    assert second.seq_len == SEQ_LEN // 2
    # every window of the new job was scored: NaN exactly at each window's first token, and not the old bytes
    nan = np.isnan(np.asarray(second.scores, np.float32))
    assert nan[:: SEQ_LEN // 2].all() and nan.sum() == len(nan[:: SEQ_LEN // 2])
    assert not np.array_equal(np.asarray(second.scores), first, equal_nan=True)


# ---- 2. --resume refuses another recipe ----

def _run_args(stores, out, *extra):
    return ["train", "--data", str(stores["reference"].path), "--model-preset", "nano", "--seq-len", str(SEQ_LEN),
            "--batch-size", "4", "--max-tokens", str(8 * 4 * SEQ_LEN), "--save-every", str(4 * 4 * SEQ_LEN),
            "--out", str(out), *extra]


def test_resume_with_another_recipe_is_refused_naming_each_change(stores, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(stores, out)) == 0  # 8 steps, a resumable checkpoint after 4
    config, final = (out / "config.yaml").read_text(), tree(out / "final")
    args = _run_args(stores, out, "--resume")
    assert main([*args, "--ratio", "0.5", "--objective", "slm", "--score", "learner", "--batch-size", "8"]) == 2
    line = one_sentence(capsys, "--resume would continue", "--objective 'clm' -> 'slm'", "--ratio 0.6 -> 0.5",
                        "--batch-size 4 -> 8", "config.yaml")
    assert "--threads" not in line and "--score" in line
    assert main([*args, "--lr", "0.01", "--seed", "3"]) == 2
    one_sentence(capsys, "--lr 0.002 -> 0.01", "--seed 0 -> 3")
    assert main([*args, "--max-tokens", str(16 * 4 * SEQ_LEN)]) == 2
    one_sentence(capsys, f"--max-tokens {8 * 4 * SEQ_LEN} -> {16 * 4 * SEQ_LEN}",
                 f"start a new run with --model {out / 'final'}")
    assert (out / "config.yaml").read_text() == config and tree(out / "final") == final


def test_resume_may_change_how_a_run_is_watched_and_checks_the_data_by_content(stores, data_dir, tmp_path, capsys):
    data = copy_store(stores["reference"], tmp_path / "data")
    out = tmp_path / "run"
    args = _run_args(stores, out)
    args[args.index("--data") + 1] = str(data)
    assert main([*args, "--threads", "2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["threads"] == 2  # the thread count in use
    uninterrupted = tree(out / "final")
    os.symlink(data, tmp_path / "same")  # another path to the same folder is the same --data
    again = [*args, "--resume", "--threads", "1", "--log-every", "2", "--eval-every", "100000", "--keep-last", "1"]
    again[again.index("--data") + 1] = str(tmp_path / "same")
    assert main(again) == 0
    assert "resuming from" in capsys.readouterr().out
    assert tree(out / "final").keys() == uninterrupted.keys()
    # the store rebuilt in place under the same path: the run's data changed, and the resume is refused
    assert main(["prepare", str(data_dir["heldout"]), "--tokenizer", str(data), "--text-field", "question",
                 "--overwrite", "--out", str(data)]) == 0
    capsys.readouterr()
    assert main(again) == 2
    one_sentence(capsys, "the TokenStore's content", "rebuilt since")


# ---- 3. runs that train on nothing stop ----

def test_a_selection_that_stays_empty_stops_the_run_saying_why(stores, corpus_scores, tmp_path, capsys):
    base = ["train", "--data", str(stores["corpus"].path), "--scores", str(corpus_scores.path), "--objective", "slm",
            "--model-preset", "nano", "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--max-tokens",
            str(40 * 2 * SEQ_LEN)]
    assert main([*base, "--rule", "threshold", "--threshold", "50", "--out", str(tmp_path / "t")]) == 2
    line = one_sentence(capsys, "no token was selected in 10 steps in a row", "--threshold 50 is above every score",
                        "scores seen from", "lower --threshold")
    low, high = (float(x) for x in line.split("scores seen from ")[1].split(")")[0].split(" to "))
    assert low < high < 50
    assert not (tmp_path / "t" / "final").exists()

    # every stored score NaN: refused before any work
    nan_scores = tmp_path / "nan"
    shutil.copytree(corpus_scores.path, nan_scores)
    np.full(stores["corpus"].n_tokens, np.nan, np.float16).tofile(nan_scores / "scores.bin")
    manifest = json.loads((nan_scores / "manifest.json").read_text())
    manifest["sha256"]["scores.bin"], manifest["mean_loss"] = sha256_file(nan_scores / "scores.bin"), None
    (nan_scores / "manifest.json").write_text(json.dumps(manifest))
    base[base.index("--scores") + 1] = str(nan_scores)
    assert main([*base, "--out", str(tmp_path / "n")]) == 2
    one_sentence(capsys, "hold no finite score", "rho1 score")


@pytest.fixture
def own_scores():
    """Score functions a test registers, removed afterwards (the registry is the process's)."""
    from rho1.selection import SCORES

    before = set(SCORES)
    yield
    for name in set(SCORES) - before:
        del SCORES[name]


def test_nan_scores_are_never_selected_whoever_computes_them(own_scores):
    from rho1.selection import register_score, selective_loss

    register_score("all-nan", lambda learner, reference, generator=None: torch.full_like(learner, float("nan")),
                   needs_reference=False)
    register_score("half-nan", lambda learner, reference, generator=None: torch.where(
        torch.arange(learner.numel()).view_as(learner) % 2 == 0, learner, float("nan")), needs_reference=False)
    logits, labels = torch.randn(2, 8, 11), torch.randint(0, 11, (2, 8))
    nothing = selective_loss(logits, labels, None, 0.6, "all-nan")
    assert int(nothing.mask.sum()) == 0 and nothing.n_selected == 0 and nothing.score_range is None
    half = selective_loss(logits, labels, None, 0.9, "half-nan")
    even = torch.arange(16).view(2, 8) % 2 == 0
    assert int(half.mask.sum()) == round(0.9 * 8) and not (half.mask & ~even).any()  # ranked among the 8 it scored


# ---- 4. an output inside an input; --overwrite replaces only a store's own files ----

def test_outputs_inside_inputs_are_refused_and_overwrite_keeps_foreign_files(stores, corpus_scores, reference_model,
                                                                             data_dir, tmp_path, capsys):
    store = copy_store(stores["heldout"], tmp_path / "store")
    before = tree(store)
    assert main(["export", "--data", str(store), "--model", str(reference_model), "--score", "learner",
                 "--out", str(store / "exp")]) == 2
    one_sentence(capsys, f"--out {store / 'exp'} is inside --data {store}")
    assert main(["score", "--data", str(store), "--model", str(reference_model), "--out", str(store / "s")]) == 2
    one_sentence(capsys, "is inside --data")
    assert main(["train", "--data", str(store), "--out", str(store / "run")]) == 2
    one_sentence(capsys, "is inside --data")
    assert tree(store) == before
    # a file of the user's in the store folder survives --overwrite; the store is the new one
    (store / "NOTES.md").write_text("mine")
    assert main(["prepare", str(data_dir["heldout"]), "--tokenizer", str(stores["heldout"].path),
                 "--text-field", "question", "--overwrite", "--out", str(store)]) == 0
    assert (store / "NOTES.md").read_text() == "mine"
    rebuilt = TokenStore.open(store).verify()
    assert rebuilt.hash != stores["heldout"].hash and sorted(p.name for p in store.iterdir()) == sorted(
        ["NOTES.md", "manifest.json", "tokens.bin", "doc_offsets.npy", "tokenizer"])


# ---- 5. one writer per folder; readers name the file and line ----

def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(stores, tmp_path, capsys):
    out = tmp_path / "run"
    with write_lock(out, "rho1 train"):
        assert main(_run_args(stores, out)) == 2
        one_sentence(capsys, f"{out} is being written by another process (rho1 train, pid {os.getpid()}")
    assert not lock_path(out).exists() and not out.exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rho1.lock import write_lock\n"
                               f"with write_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    assert main(["prepare", str(stores["reference"].path / "tokenizer" / "tokenizer.json"), "--tokenizer",
                 str(stores["reference"].path), "--out", str(out)]) == 2
    one_sentence(capsys, "is being written by another process (rho1, pid")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()  # left behind by the killed process, and taken over
    assert main(_run_args(stores, out, "--max-tokens", str(2 * 4 * SEQ_LEN))) == 0
    assert (out / "final" / "config.json").is_file() and not lock_path(out).exists()


def test_readers_name_the_file_and_line_they_cannot_parse(stores, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(stores, out, "--max-tokens", str(2 * 4 * SEQ_LEN))) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:40] + lines[1][50:], *lines[2:]]) + "\n")
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 2
    one_sentence(capsys, f"{out / 'metrics.jsonl'} line 2 is not valid JSON")


# ---- 6. a full disk while scoring is one sentence, not a bus error ----

def test_full_disk_while_scoring_is_one_sentence(stores, reference_model, tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        assert stores["corpus"].n_tokens * 2 > 64 * 1024  # the scores cannot fit
        result = subprocess.run([sys.executable, "-m", "rho1", "score", "--data", str(stores["corpus"].path),
                                 "--model", str(reference_model), "--seq-len", str(SEQ_LEN), "--out",
                                 str(disk / "scores")], env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("score")]
        assert len(lines) == 1 and "no space left on device" in lines[0] and "free some space" in lines[0], lines
        assert not (disk / "scores" / "scores.bin").exists()


# ---- 7. score functions are held to their contract ----

def test_built_in_scores_cannot_be_replaced_and_a_wrong_shape_is_one_sentence(own_scores):
    from rho1.selection import SCORES, register_score, selective_loss

    builtin = SCORES["excess"].fn
    with pytest.raises(ValueError, match="'excess' is a built-in score function; register yours under another name"):
        register_score("excess", lambda learner, reference, generator=None: -learner)
    assert SCORES["excess"].fn is builtin
    logits, labels = torch.randn(2, 8, 11), torch.randint(0, 11, (2, 8))
    register_score("scalar", lambda learner, reference, generator=None: learner.mean(), needs_reference=False)
    with pytest.raises(ValueError, match=r"score function 'scalar' returned a tensor of shape \(\); it must return a "
                                         r"tensor of one score per token, shaped like the learner's losses: \(2, 8\)"):
        selective_loss(logits, labels, None, 0.5, "scalar")
    register_score("listy", lambda learner, reference, generator=None: learner.tolist(), needs_reference=False)
    with pytest.raises(ValueError, match="'listy' returned a list"):
        selective_loss(logits, labels, None, 0.5, "listy")


# ---- 8. messages that named the wrong thing ----

def test_damaged_stores_and_sources_get_the_right_sentence(stores, corpus_scores, reference_model, data_dir, tmp_path,
                                                           capsys):
    scores = tmp_path / "scores"
    shutil.copytree(corpus_scores.path, scores)
    manifest = json.loads((scores / "manifest.json").read_text())
    (scores / "manifest.json").write_text(json.dumps({**manifest, "n_tokens": manifest["n_tokens"] - 1}))
    train = ["train", "--data", str(stores["corpus"].path), "--objective", "slm", "--seq-len", str(SEQ_LEN)]
    assert main([*train, "--scores", str(scores), "--out", str(tmp_path / "r")]) == 2
    line = one_sentence(capsys, f"count {manifest['n_tokens'] - 1:,} tokens", f"holds {manifest['n_tokens']:,}")
    assert "hash" not in line

    store = copy_store(stores["corpus"], tmp_path / "no-tokenizer")
    shutil.rmtree(store / "tokenizer")
    assert main(["train", "--data", str(store), "--out", str(tmp_path / "r2")]) == 2
    one_sentence(capsys, "has lost its tokenizer/ folder", "rho1 prepare")

    store = copy_store(stores["corpus"], tmp_path / "edited")
    m = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**m, "vocab_size": 100}))
    assert main(["train", "--data", str(store), "--model-preset", "nano", "--out", str(tmp_path / "r3")]) == 2
    one_sentence(capsys, "holds token id", "vocab_size 100", "edited or damaged")

    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(data_dir["heldout"], folder / "train.jsonl")
    assert main(["prepare", f"hf:{folder}", "--split", "test", "--tokenizer", str(stores["corpus"].path),
                 "--template", "{question}", "--out", str(tmp_path / "p")]) == 2
    one_sentence(capsys, "has no split 'test'", "pass --split", "train")

    loop = tmp_path / "loop.txt"
    os.symlink(loop, loop)
    assert main(["prepare", str(loop), "--tokenizer", str(stores["corpus"].path), "--out", str(tmp_path / "p")]) == 2
    one_sentence(capsys, "is a symbolic link that leads nowhere")

    cp1252 = tmp_path / "windows.txt"
    cp1252.write_bytes("\u201cQuoted\u201d \u2014 5\u20ac".encode("cp1252"))
    assert main(["prepare", str(cp1252), "--tokenizer", str(stores["corpus"].path), "--out", str(tmp_path / "p")]) == 2
    one_sentence(capsys, "is not UTF-8 text", "iconv -f cp1252 -t utf-8")
    assert not (tmp_path / "p").exists()


def test_view_of_a_run_needs_checkpoints_and_a_run(stores, tmp_path, capsys):
    assert main(["view", "--run", str(tmp_path / "missing"), "--data", str(stores["heldout"].path),
                 "--out", str(tmp_path / "v.html")]) == 2
    one_sentence(capsys, "does not exist")
    run = tmp_path / "run"
    assert main(_run_args(stores, run, "--max-tokens", str(2 * 4 * SEQ_LEN), "--save-every", "0")) == 0
    capsys.readouterr()
    assert main(["view", "--run", str(run), "--data", str(stores["heldout"].path), "--out",
                 str(tmp_path / "v.html")]) == 2
    one_sentence(capsys, "fewer than 2 checkpoints", "--save-every", "--model RUN/final")
    assert not (tmp_path / "v.html").exists()


# ---- 9. the README as written; 10. the thread count ----

def test_export_takes_the_window_length_of_its_scores(stores, corpus_scores, reference_model, tmp_path):
    assert main(["export", "--data", str(stores["corpus"].path), "--scores", str(corpus_scores.path), "--model",
                 str(reference_model), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["seq_len"] == SEQ_LEN


def test_the_run_says_its_steps_tokens_and_threads(stores, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(stores, out, "--max-tokens", "1000", "--threads", "1")) == 0
    printed = capsys.readouterr().out
    assert f"4 steps of {4 * SEQ_LEN:,} tokens = {4 * 4 * SEQ_LEN:,} tokens; --max-tokens 1,000 rounded up to " \
           "whole steps" in printed
    assert "1 CPU threads" in printed and "1 threads)" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["threads"] == 1
    assert json.loads((out / "summary.json").read_text())["threads"] == 1


def test_resume_of_a_finished_run_without_checkpoints_replaces_nothing(stores, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(stores, out, "--save-every", "0")) == 0
    final = tree(out / "final")
    capsys.readouterr()
    assert main(_run_args(stores, out, "--save-every", "0", "--resume", "--lr", "0.01")) == 2
    one_sentence(capsys, "holds a finished run with no resumable checkpoint", f"--model {out / 'final'}")
    assert tree(out / "final") == final
