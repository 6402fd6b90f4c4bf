"""`rho1 prepare` on small files: formats, refusals, dtypes."""


import pytest
from conftest import MATH_TEMPLATE
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rho1.data.prepare import PrepareConfig, prepare


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


def test_jsonl_is_read_a_line_at_a_time(tmp_path):
    """A line separator inside a JSON string (U+2028, valid raw JSON) stays in its record and does not shift the
    line numbers, CRLF lines and a byte-order mark are read, and a bad byte is reported at its offset in the
    file, with nothing left behind."""
    from rho1.data.sources import read_documents

    good = tmp_path / "good.jsonl"  # a byte-order mark, U+2028 in a string, CRLF, a last line without newline
    good.write_bytes('\ufeff{"text": "one\u2028two"}\r\n\n{"text": "three"}\n{"text": "four"}'.encode())
    assert [d.text for d in read_documents([good])] == ["one\u2028two", "three", "four"]
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes('{"text": "a\u2028b"}\n{"text": "c"}\n{"text": \n'.encode())
    with pytest.raises(ValueError, match=r"broken.jsonl line 3 is not valid JSON"):
        list(read_documents([broken]))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl is not UTF-8 text \(bad byte at offset 30\)"):
        list(read_documents([bad]))
    (tmp_path / "tok").mkdir()  # found only as it streams, after the first documents: no half-written store stays
    prepare(PrepareConfig([str(good)], str(tmp_path / "tok" / "s"), train_tokenizer=300), progress=False)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        prepare(PrepareConfig([str(bad)], str(tmp_path / "s"), tokenizer=str(tmp_path / "tok" / "s")), progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


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


def test_label_field_labels_records_and_names_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one two", "source": "x"}\n{"text": "three", "source": "y"}\n'
                                      '{"text": "four", "source": "x"}\n')
    (tmp_path / "b.txt").write_text("five six")
    store = prepare(PrepareConfig([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], str(tmp_path / "s"),
                                  train_tokenizer=300, label_field="source"), progress=False)
    assert store.label_names == ["x", "y", "b.txt"]
    assert store.doc_labels.tolist() == [0, 1, 0, 2]
    plain = prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "p"), train_tokenizer=300),
                    progress=False)
    assert plain.label_names == [] and plain.doc_labels is None
    assert plain.hash == prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tmp_path / "q"), train_tokenizer=300,
                                               label_field="source"), progress=False).hash  # scores still fit
    (tmp_path / "c.jsonl").write_text('{"text": "seven"}\n')
    with pytest.raises(ValueError, match="c.jsonl line 1 has no field 'source' for --label-field"):
        prepare(PrepareConfig([str(tmp_path / "c.jsonl")], str(tmp_path / "c"), train_tokenizer=300,
                              label_field="source"), progress=False)
