"""Token dynamics, the token viewer, the report and the sweep, on real tiny runs."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ_LEN, read_metrics

from rho1.analysis.dynamics import DynamicsConfig, compute_dynamics, run_checkpoints
from rho1.analysis.report import ReportConfig, build_report
from rho1.analysis.viewer import ViewConfig, build_view, token_pieces, visible_parts
from rho1.cli import main
from rho1.data.loader import make_batch
from rho1.data.prepare import PrepareConfig, prepare
from rho1.model import load_model
from rho1.selection import num_selected
from rho1.train import TrainConfig, train

HOSTILE = ('Plain words first.\n<script>window.__pwned = 1</script> and </span></div> with "double" and '
           "'single' quotes, a NUL \x00 here, right-to-left \u202egnirts desrever\u202c, zero-width \u200b, "
           '<img src=x onerror="window.__pwned=2"> & an ampersand.\n') * 12


@pytest.fixture(scope="module")
def dyn_run(stores, reference_model, tmp_path_factory):
    """A short CLM run from the reference model with a checkpoint every 2,048 tokens, all kept."""
    out = tmp_path_factory.mktemp("dyn") / "run"
    train(TrainConfig(data=str(stores["corpus"].path), out=str(out), model=str(reference_model), seq_len=SEQ_LEN,
                      batch_size=8, max_tokens=6144, lr=3e-3, warmup_steps=2, save_every=2048, keep_last=0,
                      eval_data=[str(stores["heldout"].path)]), progress=False)
    return out


def test_dynamics_matrix_equals_direct_forwards(stores, dyn_run, tmp_path):
    dyn = compute_dynamics(DynamicsConfig(run=str(dyn_run), data=str(stores["heldout"].path), max_windows=6,
                                          out=str(tmp_path / "dyn")), progress=False)
    checkpoints = run_checkpoints(dyn_run)
    assert [t for t, _ in checkpoints] == [0, 2048, 4096, 6144]  # start model, 2 checkpoints, final
    assert dyn.losses.shape == (4, len(dyn.positions)) and len(dyn.positions) == 6 * (SEQ_LEN - 1)
    for row, (_, path) in enumerate(checkpoints):
        model = load_model(str(path)).eval()
        batch = make_batch(stores["heldout"], np.arange(6), SEQ_LEN)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids).logits
        direct = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), reduction="none")
        keep = batch.positions.reshape(-1) >= 0
        expected = dict(zip(batch.positions.reshape(-1)[keep].tolist(), direct[keep].tolist()))
        np.testing.assert_allclose(dyn.losses[row], [expected[p] for p in dyn.positions], rtol=1e-5, atol=1e-5)
    shares = dyn.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["H->L"] > 0  # training on more GSM8K-like text lowers some held-out losses
    meta = json.loads((tmp_path / "dyn" / "meta.json").read_text())
    assert meta["shares"] == shares and (tmp_path / "dyn" / "classes.png").stat().st_size > 1000
    # computed once: a second call reads the stored matrix
    mtime = (tmp_path / "dyn" / "losses.npy").stat().st_mtime_ns
    again = compute_dynamics(DynamicsConfig(run=str(dyn_run), data=str(stores["heldout"].path), max_windows=6,
                                            out=str(tmp_path / "dyn")), progress=False)
    assert (tmp_path / "dyn" / "losses.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.classes, dyn.classes)


def test_dynamics_need_two_checkpoints(stores, corpus_scores, tmp_path):
    out = tmp_path / "one"
    train(TrainConfig(data=str(stores["corpus"].path), out=str(out), model_preset="nano", seq_len=SEQ_LEN,
                      batch_size=8, max_tokens=1024), progress=False)
    with pytest.raises(ValueError, match="at least 2: train with --save-every"):
        compute_dynamics(DynamicsConfig(run=str(out), data=str(stores["heldout"].path)), progress=False)


def test_token_pieces_join_to_the_text(stores):
    tok = stores["corpus"].tokenizer()
    ids = stores["corpus"].tokens[:400]
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids)
    ids = tok("naïve café – 数学 😀 done").input_ids  # multi-byte characters split over byte-level tokens
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids)


def test_viewer_highlights_exactly_the_selected_tokens(stores, corpus_scores, reference_model, dyn_run):
    fragment, numbers = build_view(ViewConfig(data=str(stores["corpus"].path), model=[str(dyn_run / "final")],
                                              scores=str(corpus_scores.path), ratio=0.3, seq_len=SEQ_LEN, windows=3))
    highlighted = len(re.findall(r'class="t selected"', fragment))
    # 3 windows, the first token of each has no reference loss
    assert numbers["tokens"] == 3 * SEQ_LEN
    assert highlighted == numbers["selected"] == num_selected(3 * (SEQ_LEN - 1), 0.3)
    assert len(re.findall(r'class="t (un)?selected"', fragment)) == 3 * SEQ_LEN
    assert re.search(r'title="learner \d+\.\d\d &middot; reference \d+\.\d\d &middot; excess -?\d+\.\d\d"', fragment)
    # held-out text with a reference model instead of a ScoreStore; several checkpoints: 5-level tendency
    fragment, numbers = build_view(ViewConfig(data=str(stores["heldout"].path), reference=str(reference_model),
                                              model=[str(p) for _, p in run_checkpoints(dyn_run)], seq_len=SEQ_LEN))
    assert fragment.count('<div class="tokens">') == 4
    levels = [len(re.findall(rf'class="t l{i}"', fragment)) for i in range(5)]
    assert sum(levels) == 4 * numbers["tokens"] and min(levels) > 0


def _hostile_store(tmp_path, stores):
    (tmp_path / "hostile.txt").write_text(HOSTILE)
    return prepare(PrepareConfig([str(tmp_path / "hostile.txt")], str(tmp_path / "hostile"),
                                 tokenizer=str(stores["corpus"].path)), progress=False)


def test_hostile_text_is_escaped(stores, reference_model, tmp_path):
    store = _hostile_store(tmp_path, stores)
    fragment, _ = build_view(ViewConfig(data=str(store.path), model=[str(reference_model)],
                                        reference=str(reference_model), seq_len=SEQ_LEN, windows=4))
    assert "<script" not in fragment and "<img" not in fragment and "</span></div> with" not in fragment
    assert "&lt;script&gt;" in fragment or "&lt;" in fragment
    assert "\x00" not in fragment and "\u202e" not in fragment  # shown as code points
    assert "U+0000" in fragment and "U+202E" in fragment
    assert visible_parts("a\u202eb\n") == [(False, "a"), (True, "U+202E"), (False, "b\n")]


def test_report_compares_runs_with_plots_and_efficiency(stores, corpus_scores, dyn_run, tmp_path):
    kw = dict(data=str(stores["corpus"].path), model_preset="nano", seq_len=SEQ_LEN, batch_size=8, max_tokens=4096,
              eval_every=1024, eval_data=[str(stores["heldout"].path)], scores=str(corpus_scores.path))
    train(TrainConfig(out=str(tmp_path / "clm"), **kw), progress=False)
    train(TrainConfig(out=str(tmp_path / "slm"), objective="slm", **kw), progress=False)
    html, summary = build_report(ReportConfig(runs=[str(tmp_path / "clm"), str(tmp_path / "slm"), str(dyn_run)]),
                                 viewer_html="<p>excerpt</p>")
    assert summary["target"] == "eval/heldout/target_loss" and summary["baseline"] == "clm"
    assert summary["runs"]["clm"]["token_efficiency"] == pytest.approx(1.0)
    assert summary["runs"]["slm"]["token_efficiency"] > 0
    assert html.count('<img src="data:image/png;base64,') >= 4
    assert html.count("<tr>") == 4 and "<p>excerpt</p>" in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch
    assert "Content-Security-Policy" in html
    last = [r for r in read_metrics(tmp_path / "slm") if r["kind"] == "eval"][-1]
    assert f"{last['eval/heldout/target_loss']:.4f}" in html


def test_cli_dynamics_view_report_and_sweep(stores, corpus_scores, dyn_run, data_dir, tmp_path, capsys):
    assert main(["dynamics", str(dyn_run), "--data", str(stores["heldout"].path), "--max-windows", "4"]) == 0
    assert "dynamics:" in capsys.readouterr().out
    view_html = tmp_path / "view.html"
    assert main(["view", "--data", str(stores["corpus"].path), "--run", str(dyn_run), "--scores",
                 str(corpus_scores.path), "--seq-len", str(SEQ_LEN), "--windows", "1", "--out", str(view_html)]) == 0
    assert view_html.read_text().count('<div class="tokens">') == 4  # 0/33/66/100%
    assert main(["report", str(dyn_run), "--out", str(tmp_path / "report.html")]) == 0
    assert "Token dynamics: run" in (tmp_path / "report.html").read_text()
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", "--data", str(stores["corpus"].path), "--scores", str(corpus_scores.path), "--model-preset",
            "nano", "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--max-tokens", "2048", "--eval-data",
            str(stores["heldout"].path), "--ratios", "0.5", "1.0", "--score-functions", "excess", "random",
            "--out", str(sweep_dir)]
    assert main(args) == 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    # the ablation at 0.6 gets an excess-loss run at 0.6 to compare with
    assert set(result["runs"]) == {"ratio-0.5", "ratio-0.6", "clm", "score-random"}
    assert result["runs"]["score-random"]["ratio"] == 0.6 and (sweep_dir / "sweep.png").is_file()
    assert all("answer_accuracy" not in r for r in result["runs"].values())
    # --answers over runs an earlier sweep finished: their accuracy is measured, not formatted as None
    args += ["--answers", str(data_dir["heldout"]), "--shots", "1", "--answers-limit", "3"]
    assert main(args) == 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert all(0.0 <= r["answer_accuracy"] <= 1.0 for r in result["runs"].values())
    assert (sweep_dir / "sweep_accuracy.png").is_file() and "answer accuracy" in (sweep_dir / "sweep.html").read_text()
    assert main(args) == 0 and "already done" in capsys.readouterr().out  # a rerun skips finished runs
    assert main(["sweep", "--data", str(stores["corpus"].path), "--ratios", "1.5"]) == 2
    assert "selection ratio must be in (0, 1]" in capsys.readouterr().err
