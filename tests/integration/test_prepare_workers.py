"""`rho1 prepare --workers N` writes exactly the bytes one process writes."""

import json
import os
import subprocess
import sys

from conftest import MATH_TEMPLATE

from rho1.data.prepare import PrepareConfig, prepare

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_workers_write_the_bytes_of_one(data_dir, stores, tmp_path):
    records = [json.loads(line) for line in data_dir["mixed_math"].read_text().splitlines()]
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({**r, "source": "even" if i % 2 else "odd"}) + "\n"
                                for i, r in enumerate(records)))
    kw = dict(tokenizer=str(stores["corpus"].path), template=MATH_TEMPLATE, target_field="answer",
              label_field="source", batch_docs=16)
    one = prepare(PrepareConfig([str(labelled), str(data_dir["shakespeare"])], str(tmp_path / "one"), **kw),
                  progress=False)
    two = prepare(PrepareConfig([str(labelled), str(data_dir["shakespeare"])], str(tmp_path / "two"), workers=2, **kw),
                  progress=False)
    names = sorted(p.name for p in one.path.iterdir() if p.is_file() and p.name != "manifest.json")
    assert names == ["doc_labels.npy", "doc_offsets.npy", "target_mask.bin", "tokens.bin"]
    for name in names:
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes(), name
    assert one.hash == two.hash and one.manifest["sha256"] == two.manifest["sha256"]
    assert one.n_tokens > 10 * 16 and one.manifest["n_docs"] > 3 * 16  # several batches went to each worker


def test_a_bad_file_with_workers_is_one_sentence(data_dir, stores, tmp_path):
    bad = tmp_path / "bad.txt"  # after a good file, so the workers are running when it is read
    bad.write_bytes(b"fine text\n\xff\xfe not utf-8\n")
    result = subprocess.run([sys.executable, "-m", "rho1", "prepare", str(data_dir["shakespeare"]), str(bad),
                             "--tokenizer", str(stores["corpus"].path), "--out", str(tmp_path / "store"),
                             "--workers", "2"], env=ENV, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("prepare: ")]  # progress
    assert len(lines) == 1 and "bad.txt" in lines[0] and "utf-8" in lines[0].lower()
    assert not (tmp_path / "store").exists()
