"""A reference model with another tokenizer (rho1.align): scores projected onto the learner's tokens."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MATH_TEMPLATE, SEQ_LEN
from transformers import PreTrainedTokenizerFast

from rho1.align import CrossTokenizerReference, Plan, _project, token_bytes
from rho1.data.loader import make_batch
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import ScoreStore
from rho1.data.tokenizer import EOS, train_bpe
from rho1.score import ScoreConfig, score
from rho1.train import TrainConfig, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
UNICODE = ["Le café coûte 3½ € 🙂 — naïve Ωmega, 東京 and ø.", "Émoji 🙂🙂 then 1,234 × 5 = 6,170.\nNext line…"]


@pytest.fixture(scope="module")
def other_reference(data_dir, tmp_path_factory):
    """A nano model with its own tokenizer (a BPE of another vocabulary, with EOS as BOS as GPT-2 has), briefly
    trained on the clean math."""
    d = tmp_path_factory.mktemp("other")
    texts = [json.loads(line) for line in data_dir["reference"].read_text().splitlines()]
    tok = train_bpe([MATH_TEMPLATE.format(**r) for r in texts] + UNICODE * 5, 700)
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    tok.save_pretrained(d / "tokenizer")
    store = prepare(PrepareConfig([str(data_dir["reference"])], str(d / "store"), tokenizer=str(d / "tokenizer"),
                                  template=MATH_TEMPLATE), progress=False)
    train(TrainConfig(data=str(store.path), out=str(d / "run"), model_preset="nano", seq_len=SEQ_LEN, batch_size=8,
                      max_tokens=30_000, lr=3e-3, warmup_steps=5), progress=False)
    return d / "run" / "final"


@pytest.fixture(scope="module")
def unicode_store(stores, tmp_path_factory):
    d = tmp_path_factory.mktemp("unicode")
    docs = [{"question": q, "answer": a} for q, a in zip(UNICODE * 3, reversed(UNICODE * 3))]
    docs.append({"question": " ".join(UNICODE * 6), "answer": "a document longer than a window " * 8})
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    return prepare(PrepareConfig([str(d / "docs.jsonl")], str(d / "store"), tokenizer=str(stores["corpus"].path),
                                 template=MATH_TEMPLATE), progress=False)


def test_same_tokenizer_gives_the_direct_scores(stores, reference_model, corpus_scores, tmp_path):
    cross = score(ScoreConfig(str(stores["corpus"].path), str(reference_model), str(tmp_path / "cross"), SEQ_LEN,
                              batch_size=16, cross_tokenizer=True), progress=False)
    direct = np.asarray(corpus_scores.scores, np.float32)
    projected = np.asarray(cross.scores, np.float32)
    np.testing.assert_array_equal(np.isnan(projected), np.isnan(direct))
    both = np.isfinite(direct)
    ulp = np.spacing(np.abs(direct[both]).astype(np.float16)).astype(np.float32)
    assert (np.abs(projected[both] - direct[both]) <= ulp).all()  # equal to float16 rounding
    assert (projected[both] == direct[both]).mean() > 0.99
    assert cross.manifest["cross_tokenizer"]["projection"] == "bytes-even-v1"


def test_learner_tokens_map_to_their_bytes(stores):
    tok = stores["corpus"].tokenizer()
    table = token_bytes(tok)
    for text in UNICODE:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids).decode("utf-8") == text
    assert table[tok.eos_token_id] is None


def test_projection_preserves_each_documents_sum_and_handles_multibyte_characters(unicode_store, other_reference):
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import load_model

    learner_tok = unicode_store.tokenizer()
    ref = CrossTokenizerReference(load_model(str(other_reference)), load_tokenizer(other_reference), learner_tok)
    assert ref.bos is not None
    table = token_bytes(learner_tok)
    split_chars = checked = 0
    for window in range(unicode_store.num_windows(SEQ_LEN)):
        batch = make_batch(unicode_store, [window], SEQ_LEN)
        ids = batch.input_ids[0].tolist()
        projected = ref.losses(batch.input_ids)[0].double()  # projected[t] = loss of learner token t + 1
        (plan,) = ref._windows(batch.input_ids.numpy())
        ref_ids, runs = plan.ref_ids.tolist(), plan.runs
        with torch.no_grad():
            logits = ref.model(input_ids=torch.tensor([ref_ids])).logits[0, :-1]
        raw = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(ref_ids[1:]), reduction="none")
        # every run of normal tokens that follows an EOS inside the window is a whole document (or its start)
        for r, (first, offsets, head, usable) in enumerate(runs):
            if first == 0:
                continue
            n = len(offsets) - 1
            got = projected[first - 1 : first - 1 + n]
            ref_k = np.flatnonzero(plan.run_of == r).tolist()
            want = sum(float(raw[k - 1]) for k in ref_k)
            if usable == offsets[-1] and head == 0:
                assert torch.isfinite(got).all()
                assert float(got.sum()) == pytest.approx(want, rel=1e-6)  # float32 losses
                checked += 1
            for t in ids[first : first + n]:  # tokens holding part of a character only
                try:
                    table[t].decode("utf-8")
                except UnicodeDecodeError:
                    split_chars += 1
        # the learner's EOS takes the reference's EOS loss at that place
        for k, position in enumerate(plan.kind):
            if position > 0:  # a learner EOS (after the window's first token)
                assert float(projected[position - 1]) == pytest.approx(float(raw[k - 1]), rel=1e-6)
    assert split_chars > 0 and checked >= 3  # documents checked; characters split over byte tokens among them


def _plan(spans: list, tokens: list) -> Plan:
    """A window by hand: reference spans (None for a BOS) over one run of learner tokens of ``tokens`` bytes."""
    kind = np.array([-2 if x is None else -1 for x in spans])
    start, end = (np.array([0 if x is None else x[i] for x in spans]) for i in (0, 1))
    tok_end = np.cumsum(tokens)
    return Plan(np.zeros(len(spans), np.int64), kind, start, end, np.zeros(len(spans), np.int64),
                np.where(kind == -1, 0, -1), tok_end - np.array(tokens), tok_end, np.zeros(len(tokens), bool),
                [(0, np.concatenate([[0], tok_end]), 0, int(tok_end[-1]))])


def test_project_spreads_each_reference_token_over_its_bytes():
    # learner tokens "ab" "c" "de", reference tokens "a" "bcd" "e" with losses 1, 3, 2 (the first has a BOS before it)
    plan = _plan([None, (0, 1), (1, 4), (4, 5)], [2, 1, 2])
    out = _project(np.array([np.nan, 1.0, 3.0, 2.0]), plan, 3)
    np.testing.assert_allclose(out, [1.0 + 1.0, 1.0, 1.0 + 2.0])
    assert out.sum() == pytest.approx(6.0)
    # a reference token without a loss blocks the learner tokens it touches; an empty span goes to the byte before
    out = _project(np.array([np.nan, np.nan, 3.0, 2.0, 4.0]), _plan([None, (0, 1), (1, 4), (4, 5), (5, 5)], [2, 1, 2]),
                   3)
    assert np.isnan(out[0]) and out[1] == pytest.approx(1.0) and out[2] == pytest.approx(1.0 + 2.0 + 4.0)


def test_window_edge_inside_a_character_is_not_selectable(unicode_store, other_reference):
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import load_model

    learner_tok = unicode_store.tokenizer()
    table = token_bytes(learner_tok)
    tokens = unicode_store.tokens
    ref = CrossTokenizerReference(load_model(str(other_reference)), load_tokenizer(other_reference), learner_tok)
    for seq_len in range(24, 80):  # a window length whose first window ends inside a character
        last = table[int(tokens[seq_len - 1])]
        nxt = table[int(tokens[seq_len])]
        if last and nxt and (nxt[0] & 0xC0) == 0x80:
            break
    else:
        pytest.fail("no window edge inside a character in the test data")
    batch = make_batch(unicode_store, [0], seq_len)
    projected = ref.losses(batch.input_ids)[0]
    assert torch.isnan(projected[seq_len - 2])  # the cut character's first bytes have no reference loss
    assert torch.isfinite(projected[: seq_len - 3]).sum() > seq_len // 2


def test_selective_trainer_counts_only_what_a_reference_tokenizer_leaves_selectable(unicode_store, other_reference,
                                                                                     tmp_path):
    """The step's denominator (get_batch_samples) leaves out the positions the projection cannot score (NaN: a
    window edge inside a character), and compute_loss uses the losses computed for it."""
    from transformers import TrainingArguments

    from rho1.data.tokenizer import load_tokenizer
    from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
    from rho1.model import build_model, load_model
    from rho1.selection import num_selected

    learner_tok, table, tokens = unicode_store.tokenizer(), token_bytes(unicode_store.tokenizer()), unicode_store.tokens
    seq_len = next(n for n in range(24, 80) if table[int(tokens[n - 1])] and table[int(tokens[n])]
                   and (table[int(tokens[n])][0] & 0xC0) == 0x80)  # the first window ends inside a character
    trainer = SelectiveTrainer(model=build_model("nano", unicode_store.vocab_size, 2048,
                                                 unicode_store.manifest["eos_token_id"]),
                               args=TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=1,
                                                      report_to=[], use_cpu=True, save_strategy="no"),
                               train_dataset=windows_dataset(unicode_store, seq_len)[:2], processing_class=learner_tok,
                               data_collator=SelectiveCollator(learner_tok),
                               reference_model=load_model(str(other_reference)),
                               reference_tokenizer=load_tokenizer(other_reference))
    batch = SelectiveCollator(learner_tok)(windows_dataset(unicode_store, seq_len)[:2])
    ref = trainer._reference_loss(batch, batch["labels"][:, 1:])
    labelled = batch["labels"][:, 1:] != -100
    [counted], items = trainer.get_batch_samples(iter([batch]), 1, "cpu")
    assert (labelled & torch.isnan(ref)).any()  # some labelled positions have no reference loss
    assert int(items) == num_selected(int((labelled & torch.isfinite(ref)).sum()), trainer.ratio)
    assert torch.equal(torch.isnan(counted["ref_loss"][:, 1:]), torch.isnan(ref))  # what compute_loss then takes
    trainer.train()


def test_a_reference_shorter_than_the_window_scores_the_end_of_each_row(unicode_store, other_reference):
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import load_model

    learner_tok = unicode_store.tokenizer()
    model, tok = load_model(str(other_reference)), load_tokenizer(other_reference)
    full = CrossTokenizerReference(model, tok, learner_tok)
    short = CrossTokenizerReference(model, tok, learner_tok, max_length=24)
    batch = make_batch(unicode_store, [0, 1, 2], SEQ_LEN)
    lengths = [len(plan.ref_ids) for plan in full._windows(batch.input_ids.numpy())]
    assert max(lengths) > 24 and len(set(lengths)) > 1  # rows of different lengths, all cut
    cut = short.losses(batch.input_ids)
    for b in range(len(lengths)):
        finite = torch.isfinite(cut[b]).nonzero().flatten()
        assert len(finite) > 5 and finite.min() > SEQ_LEN // 3  # only the end of each row is scored
        assert torch.isnan(cut[b, : SEQ_LEN // 3]).all()


def test_cross_tokenizer_scores_train_slm_and_a_mismatch_names_the_flag(stores, other_reference, tmp_path):
    store = stores["corpus"]
    plain = subprocess.run([sys.executable, "-m", "rho1", "score", "--data", str(store.path), "--model",
                            str(other_reference), "--out", str(tmp_path / "refused"), "--seq-len", str(SEQ_LEN)],
                           env=ENV, capture_output=True, text=True)
    assert plain.returncode == 2 and "--cross-tokenizer" in plain.stderr and "Traceback" not in plain.stderr
    assert len([line for line in plain.stderr.splitlines() if line.strip()]) == 1
    scores = score(ScoreConfig(str(store.path), str(other_reference), str(tmp_path / "scores"), SEQ_LEN,
                               cross_tokenizer=True), progress=False)
    values = np.asarray(scores.scores, np.float32)
    assert np.isfinite(values).mean() > 0.9 and scores.manifest["tokenizer_hash"] == store.tokenizer_hash
    assert scores.manifest["cross_tokenizer"]["reference_tokenizer_hash"] != store.tokenizer_hash
    summary = train(TrainConfig(data=str(store.path), scores=str(scores.path), objective="slm", model_preset="nano",
                                seq_len=SEQ_LEN, batch_size=4, max_tokens=2048, out=str(tmp_path / "slm")),
                    progress=False)
    assert summary["tokens"] >= 2048
    online = train(TrainConfig(data=str(store.path), reference=str(other_reference), cross_tokenizer=True,
                               objective="slm", model_preset="nano", seq_len=SEQ_LEN, batch_size=4, max_tokens=2048,
                               out=str(tmp_path / "online")), progress=False)
    assert online["tokens"] >= 2048
    stored = [json.loads(line) for line in open(tmp_path / "slm" / "metrics.jsonl") if '"train"' in line]
    in_loop = [json.loads(line) for line in open(tmp_path / "online" / "metrics.jsonl") if '"train"' in line]
    assert [r["selected"] for r in in_loop] == [r["selected"] for r in stored]
    assert in_loop[0]["loss"] == pytest.approx(stored[0]["loss"], rel=1e-5)  # the same selection as the stored scores
    with pytest.raises(ValueError, match="--cross-tokenizer applies to --reference"):
        TrainConfig(data=str(store.path), scores=str(scores.path), cross_tokenizer=True).check()
    other = ScoreStore.open(scores.path, store)
    assert other.manifest["cross_tokenizer"]["projection"] == "bytes-even-v1"


def test_selective_trainer_with_a_reference_tokenizer_sees_the_scored_losses(stores, other_reference, tmp_path):
    from transformers import TrainingArguments

    from rho1.data.tokenizer import load_tokenizer
    from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
    from rho1.model import build_model, load_model

    store = stores["corpus"]
    scores = score(ScoreConfig(str(store.path), str(other_reference), str(tmp_path / "scores"), SEQ_LEN,
                               cross_tokenizer=True), progress=False)
    ds = windows_dataset(store, SEQ_LEN)[:8]
    learner_tok = store.tokenizer()
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="needs the learner's tokenizer"):
        SelectiveTrainer(model=load_model(str(other_reference)), args=args, train_dataset=ds,
                         reference_model=load_model(str(other_reference)),
                         reference_tokenizer=load_tokenizer(other_reference))
    trainer = SelectiveTrainer(model=build_model("nano", store.vocab_size, 2048, store.manifest["eos_token_id"]),
                               args=args, train_dataset=ds, processing_class=learner_tok,
                               data_collator=SelectiveCollator(learner_tok),
                               reference_model=load_model(str(other_reference)),
                               reference_tokenizer=load_tokenizer(other_reference))
    stored = SelectiveCollator(learner_tok, scores=scores)(ds[:4])["ref_loss"][:, 1:]
    batch = SelectiveCollator(learner_tok)(ds[:4])
    in_loop = trainer._reference_loss(batch, batch["labels"][:, 1:])
    np.testing.assert_array_equal(torch.isnan(in_loop).numpy(), torch.isnan(stored).numpy())
    torch.testing.assert_close(in_loop[torch.isfinite(in_loop)], stored[torch.isfinite(stored)], atol=1e-2, rtol=1e-3)
    trainer.train()
    assert np.isfinite(trainer.selection_stats["ref_loss_selected"])


def test_a_row_the_reference_reads_as_no_token_has_no_losses(stores, reference_model):
    from rho1.data.tokenizer import load_tokenizer
    from rho1.model import load_model

    tok = stores["corpus"].tokenizer()
    ref = CrossTokenizerReference(load_model(str(reference_model)), load_tokenizer(reference_model), tok)
    assert ref.bos is None  # the same tokenizer: no BOS, so nothing stands before an empty row
    table = token_bytes(tok)
    lone = next(i for i, b in enumerate(table) if b is not None and len(b) == 1 and (b[0] & 0xC0) == 0x80)
    batch = make_batch(stores["corpus"], [0, 1], SEQ_LEN).input_ids[:, :8]
    batch[0, :3] = lone  # the end of a character cut by the window's edge, then the next window's tokens
    batch[0, 3:] = lone
    batch = batch[:, :3]  # a row of that end only: no whole character, no text, no reference token
    losses = ref.losses(batch)
    assert torch.isnan(losses[0]).all() and torch.isfinite(losses[1, :1]).all()
