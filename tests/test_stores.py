import json

import numpy as np
import pytest
from conftest import MATH_TEMPLATE, SEQ_LEN
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rho1.data.loader import make_batch
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import ScoreStore, TokenStore
from rho1.evaluate import token_losses
from rho1.model import load_model
from rho1.score import ScoreConfig, score


def test_token_store_round_trips_text(stores, data_dir):
    store = stores["corpus"]
    tok = store.tokenizer()
    offsets = store.doc_offsets
    rows = [json.loads(line) for line in data_dir["mixed_math"].read_text().splitlines()]
    assert store.manifest["n_docs"] == len(rows) + 1  # the jsonl records, then the Shakespeare file
    for i in (0, 17, len(rows) - 1):
        ids = store.tokens[offsets[i] : offsets[i + 1]]
        assert ids[-1] == store.manifest["eos_token_id"]
        assert tok.decode(ids[:-1].tolist()) == MATH_TEMPLATE.format(**rows[i])
    last = store.tokens[offsets[-2] : offsets[-1] - 1]
    assert tok.decode(last.tolist()) == data_dir["shakespeare"].read_text()
    assert store.manifest["dtype"] == "uint16"
    assert store.manifest["n_tokens"] == offsets[-1] == len(store.tokens)


def test_target_mask_marks_the_answer_tokens(stores, data_dir):
    store = stores["heldout"]
    tok = store.tokenizer()
    first = json.loads(data_dir["heldout"].read_text().splitlines()[0])
    start, end = store.doc_offsets[0], store.doc_offsets[1]
    mask = store.target_mask[start:end].astype(bool)
    answer_ids = store.tokens[start:end][mask][:-1]  # the closing EOS counts as a target too
    assert tok.decode(answer_ids.tolist()).strip() == first["answer"].strip()
    assert not mask[0]


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<eos>"] = 70_000
    vocab["<unk>"] = 70_001
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("w1 w69999 w42 w65536")
    store = prepare(PrepareConfig([str(tmp_path / "a.txt")], str(tmp_path / "s"), tokenizer=str(tmp_path / "tok")),
                    progress=False)
    assert store.manifest["dtype"] == "uint32"
    assert store.tokens.tolist() == [1, 69999, 42, 65536, 70_000]


def test_score_store_matches_a_direct_forward_of_each_window(stores, corpus_scores, reference_model):
    store = stores["corpus"]
    model = load_model(str(reference_model))
    for window in (0, 5, store.num_windows(SEQ_LEN) - 1):
        batch = make_batch(store, [window], SEQ_LEN)
        logits = model(input_ids=batch.input_ids).logits
        ce = -logits.log_softmax(-1).gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        keep = batch.positions >= 0
        stored = corpus_scores.scores[batch.positions[keep].numpy()].astype(np.float32)
        np.testing.assert_allclose(stored, ce[keep].detach().numpy(), rtol=2e-3, atol=2e-3)
        assert np.isnan(corpus_scores.scores[window * SEQ_LEN])  # the window's first token has no prediction
    assert corpus_scores.manifest["token_store_hash"] == store.hash
    assert corpus_scores.scores.dtype == np.float16


def test_dynamics_equal_token_losses_is_deterministic(stores, reference_model):
    model = load_model(str(reference_model))
    a = token_losses(model, stores["heldout"], SEQ_LEN, batch_size=4)
    b = token_losses(model, stores["heldout"], SEQ_LEN, batch_size=7)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_chunked_head_losses_equal_full_logits(stores, reference_model):
    """Scoring and evaluation compute losses from the head's input in chunks; same numbers as full logits."""
    from rho1.evaluate import linear_head_of

    model = load_model(str(reference_model))
    head_of = linear_head_of(model, stores["heldout"], SEQ_LEN)
    assert head_of is model
    full = token_losses(model, stores["heldout"], SEQ_LEN, batch_size=4)
    chunked = token_losses(model, stores["heldout"], SEQ_LEN, batch_size=4, head_of=head_of)
    assert np.isfinite(full).sum() > 1000
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5, equal_nan=True)


# -- refusals: one sentence naming the problem and the fix ---------------------------------------------

def test_scores_of_another_corpus_are_refused(stores, corpus_scores):
    with pytest.raises(ValueError, match="belong to another corpus.*rho1 score --data"):
        ScoreStore.open(corpus_scores.path, stores["heldout"])


def test_scores_of_another_tokenizer_are_refused(stores, corpus_scores, data_dir, tmp_path):
    other = prepare(PrepareConfig([str(data_dir["shakespeare"])], str(tmp_path / "other"), train_tokenizer=400),
                    progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        ScoreStore.open(corpus_scores.path, other)


def test_model_whose_vocabulary_does_not_fit_is_refused(stores, reference_model, data_dir, tmp_path):
    big = prepare(PrepareConfig([str(data_dir["shakespeare"])], str(tmp_path / "big"), train_tokenizer=900),
                  progress=False)
    with pytest.raises(ValueError, match="token embeddings but TokenStore"):
        score(ScoreConfig(str(big.path), str(reference_model), str(tmp_path / "s"), SEQ_LEN), progress=False)


def test_model_with_another_tokenizer_is_refused(reference_model, data_dir, tmp_path):
    other = prepare(PrepareConfig([str(data_dir["shakespeare"])], str(tmp_path / "o"), train_tokenizer=300),
                    progress=False)
    with pytest.raises(ValueError, match="comes with another tokenizer"):
        score(ScoreConfig(str(other.path), str(reference_model), str(tmp_path / "s"), SEQ_LEN), progress=False)


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="the corpus is empty"):
        prepare(PrepareConfig([str(tmp_path / "empty.txt")], str(tmp_path / "s"), train_tokenizer=300), progress=False)


def test_missing_jsonl_field_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "1+1?", "solution": "2"}\n')
    with pytest.raises(ValueError, match=r"line 1 has no field 'text'; pass --text-field with one of: question"):
        prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "s"), train_tokenizer=300), progress=False)
    with pytest.raises(ValueError, match="no field 'answer' used by --template"):
        prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "s"), train_tokenizer=300,
                              template=MATH_TEMPLATE), progress=False)


def test_non_utf8_file_is_refused(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(bad byte at offset 3\); convert it"):
        prepare(PrepareConfig([str(tmp_path / "latin.txt")], str(tmp_path / "s"), train_tokenizer=300), progress=False)
    assert not (tmp_path / "s").exists()


def test_truncated_token_file_is_reported(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["heldout"].path, copy)
    with open(copy / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="tokens.bin is truncated or corrupted"):
        _ = TokenStore.open(copy).tokens


def test_parquet_and_folder_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["What is 2 + 3?", "What is 4 * 5?"], "answer": ["#### 5", "#### 20"]}),
                   tmp_path / "qa.parquet")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.txt").write_text("second file")
    (tmp_path / "notes" / "a.txt").write_text("first file")
    store = prepare(PrepareConfig([str(tmp_path / "qa.parquet"), str(tmp_path / "notes")], str(tmp_path / "s"),
                                  train_tokenizer=300, template=MATH_TEMPLATE), progress=False)
    tok = store.tokenizer()
    off = store.doc_offsets
    docs = [tok.decode(store.tokens[off[i] : off[i + 1] - 1].tolist()) for i in range(len(off) - 1)]
    assert docs == ["Question: What is 2 + 3?\nAnswer: #### 5", "Question: What is 4 * 5?\nAnswer: #### 20",
                    "first file", "second file"]


def test_corrupted_token_store_is_reported_before_any_work(stores, tmp_path):
    import shutil

    from rho1.train import TrainConfig, train

    copy = tmp_path / "copy"
    shutil.copytree(stores["heldout"].path, copy)
    data = bytearray((copy / "tokens.bin").read_bytes())
    data[100] ^= 0x01  # same size, one bit flipped
    (copy / "tokens.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"copy/tokens.bin does not match the hash in its manifest .*rho1 prepare"):
        train(TrainConfig(data=str(copy), out=str(tmp_path / "run"), model_preset="nano", seq_len=SEQ_LEN),
              progress=False)
    assert not (tmp_path / "run").exists()
