import json

import numpy as np
import pytest
from conftest import MATH_TEMPLATE, SEQ_LEN

from rho1.data.loader import make_batch
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import ScoreStore, TokenStore
from rho1.head import token_losses
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
    from rho1.head import linear_head_of

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


def test_truncated_token_file_is_reported(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["heldout"].path, copy)
    with open(copy / "tokens.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="tokens.bin is truncated or corrupted"):
        _ = TokenStore.open(copy).tokens


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


def test_an_open_checks_sizes_and_times_and_hashes_a_changed_file_once(stores, tmp_path):
    """A store is trusted by the sizes and times recorded when it was written; a file edited in place is still
    caught at open, a copy without its times is hashed once (and its record renewed), a size that differs is
    refused without reading the file."""
    import json
    import os
    import shutil

    from rho1.data.store import TokenStore

    copy = tmp_path / "copy"
    shutil.copytree(stores["heldout"].path, copy)  # copy2: the times come along, the record matches
    record = json.loads((copy / "manifest.json").read_text())["files"]
    assert set(record) >= {"tokens.bin"} and TokenStore.open(copy).check()
    # a copy without its times: hashed in full once, then its record says the new time
    os.utime(copy / "tokens.bin", ns=(1, 1))
    TokenStore.open(copy).check()
    assert json.loads((copy / "manifest.json").read_text())["files"]["tokens.bin"]["mtime_ns"] == 1
    # edited in place (same size): caught at open
    data = bytearray((copy / "tokens.bin").read_bytes())
    data[10] ^= 0x01
    (copy / "tokens.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="tokens.bin does not match the hash in its manifest"):
        TokenStore.open(copy).check()
    # another size: refused from the record
    (copy / "tokens.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"tokens.bin holds [\d,]+ bytes where its manifest recorded"):
        TokenStore.open(copy).check()


def test_a_store_written_before_the_record_is_verified_once_and_rho1_verify_checks_in_full(stores, tmp_path, capsys):
    import json
    import shutil

    from rho1.cli import main
    from rho1.data.store import TokenStore

    old = tmp_path / "old"
    shutil.copytree(stores["heldout"].path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("files", "max_token_id"):
        manifest.pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    TokenStore.open(old).check()  # the full check, once, and the record made
    renewed = json.loads((old / "manifest.json").read_text())
    assert "tokens.bin" in renewed["files"] and renewed["max_token_id"] < renewed["vocab_size"]
    assert main(["verify", str(old)]) == 0 and "every file matches its hash" in capsys.readouterr().out
    renewed["vocab_size"] = renewed["max_token_id"]  # a manifest edited: an id at or above its vocabulary
    (old / "manifest.json").write_text(json.dumps(renewed))
    assert main(["verify", str(old)]) == 2
    assert "holds token id" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "is not a TokenStore (no manifest.json)" in capsys.readouterr().err
