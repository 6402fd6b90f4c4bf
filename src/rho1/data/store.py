"""On-disk artifacts: the TokenStore (a tokenized corpus) and the ScoreStore (reference losses).

TokenStore directory::

    manifest.json     dtype, counts, tokenizer name and hash, sources, content hash
    tokens.bin        one flat stream of token ids, documents separated by EOS (uint16 or uint32)
    doc_offsets.npy   int64, start of each document in the stream, plus the end
    target_mask.bin   optional uint8, 1 where a token counts for target-domain metrics
    tokenizer/        the tokenizer, saved with save_pretrained

ScoreStore directory::

    manifest.json     the TokenStore's hash, the reference model's name and hash, seq_len, completion
    scores.bin        float16, scores[i] = reference loss of token i given its window; NaN where no prediction

Training, scoring and evaluation all cut the stream into the same windows: window w covers tokens
``[w * seq_len, (w + 1) * seq_len)`` (the last one may be shorter), so a stored score is exactly the
loss the reference gives a token in the context the learner sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

TOKEN_FORMAT = "rho1.token_store/1"
SCORE_FORMAT = "rho1.score_store/1"
IGNORE_INDEX = -100  # the label of a token nothing is trained on (padding, a prompt, a token an export dropped)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, how: str = "restore or recreate it") -> dict:
    """A JSON file, or one sentence naming the file, the line and what is wrong."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text (corrupted?); {how}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno} is not valid JSON ({err.msg}, column {err.colno}); {how}") from None


def read_jsonl(path: Path, how: str = "fix or remove that line", torn_tail: bool = False) -> list[dict]:
    """Every record of a JSON-lines file (metrics.jsonl), or one sentence naming the file and the line.
    ``torn_tail``: a last line that does not parse is dropped (what a killed writer leaves)."""
    records = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail and lineno == len(lines):
                break
            raise ValueError(f"{path} line {lineno} is not valid JSON ({err.msg}, column {err.colno}); {how}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {lineno} is not a JSON object; {how}")
        records.append(record)
    return records


def read_manifest(path: Path, kind: str, expected_format: str) -> dict:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a {kind} (no manifest.json); create it with `rho1 "
                                f"{'prepare' if kind == 'TokenStore' else 'score'}`")
    manifest = read_json(manifest_path, f"the file is corrupted: recreate the {kind}")
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise ValueError(f"{path} is not a {kind} (format {getattr(manifest, 'get', lambda k: None)('format')!r}, "
                         f"expected {expected_format!r})")
    return manifest


def open_memmap(path: Path, dtype, count: int, kind: str) -> np.memmap:
    """Memory-map a raw array, refusing a file whose size does not match the manifest."""
    expected = count * np.dtype(dtype).itemsize
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the {kind} is incomplete, recreate it")
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"{path} is truncated or corrupted ({actual} bytes, manifest says {expected}); recreate the {kind}")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def num_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len`` tokens; a last window of fewer than 2 tokens has nothing to predict and is dropped."""
    full, rest = divmod(n_tokens, seq_len)
    return full + (1 if rest >= 2 else 0)


def verify_files(path: Path, manifest: dict, kind: str, how: str) -> None:
    """Check every file the manifest has a hash for; one sentence naming the file when one differs."""
    for name, digest in manifest.get("sha256", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; the {kind} is incomplete, {how}")
        if sha256_file(f) != digest:
            raise ValueError(f"{f} does not match the hash in its manifest (corrupted or changed); {how}")


def file_record(path: Path, names) -> dict:
    """Size and modification time of each file, taken when a store is written: what opening it checks."""
    record = {}
    for name in names:
        st = (Path(path) / name).stat()
        record[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return record


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (RANK), or a plain process."""
    return os.environ.get("RANK", "0") == "0"


def check_files(path: Path, manifest: dict, kind: str, how: str) -> list[str]:
    """The cheap check at open: each hashed file has its recorded size (else one sentence); a file whose mtime
    differs from the record (edited, or copied without its times) is hashed in full by the main process and
    refused on a mismatch. Returns the names it hashed (their record is then renewed, where it can be)."""
    record, hashed = manifest.get("files") or {}, []
    for name, digest in manifest.get("sha256", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; the {kind} is incomplete, {how}")
        st, known = f.stat(), record.get(name)
        if known is not None and st.st_size != known["size"]:
            raise ValueError(f"{f} holds {st.st_size:,} bytes where its manifest recorded {known['size']:,} "
                             f"(truncated or changed); {how}")
        if known is not None and st.st_mtime_ns == known["mtime_ns"]:
            continue
        if is_main_process():  # the other processes of a launch trust the size: rank 0 refuses for them all
            if sha256_file(f) != digest:
                raise ValueError(f"{f} does not match the hash in its manifest (corrupted or changed); {how}")
            hashed.append(name)
    return hashed


def renew_file_record(path: Path, manifest: dict, names: list[str]) -> None:
    """After a full hash matched, record the files' times so the next open trusts them (a read-only store is
    left as it is and hashed again next time)."""
    if not names:
        return
    renewed = {**manifest, "files": {**(manifest.get("files") or {}), **file_record(path, names)}}
    try:
        write_json_atomic(Path(path) / "manifest.json", renewed)
        manifest.update(renewed)
    except OSError:
        pass


@dataclass
class TokenStore:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        return cls(path, read_manifest(path, "TokenStore", TOKEN_FORMAT))

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @cached_property
    def tokens(self) -> np.ndarray:
        return open_memmap(self.path / "tokens.bin", self.manifest["dtype"], self.n_tokens, "TokenStore")

    @cached_property
    def target_mask(self) -> np.ndarray | None:
        if not self.manifest.get("has_target_mask"):
            return None
        return open_memmap(self.path / "target_mask.bin", np.uint8, self.n_tokens, "TokenStore")

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        return np.load(self.path / "doc_offsets.npy", allow_pickle=False)

    @property
    def label_names(self) -> list[str]:
        """The document labels (``rho1 prepare --label-field``), in the order of their ids; [] when none."""
        return self.manifest.get("labels") or []

    @cached_property
    def doc_labels(self) -> np.ndarray | None:
        """The label id of each document, or None when the store has no labels."""
        if not self.label_names:
            return None
        return np.load(self.path / "doc_labels.npy", allow_pickle=False)

    def token_labels(self, positions: np.ndarray) -> np.ndarray:
        """The label id of the document holding each stream position (-1 for a negative position)."""
        doc = np.searchsorted(self.doc_offsets, np.maximum(positions, 0), side="right") - 1
        return np.where(positions >= 0, self.doc_labels[np.minimum(doc, len(self.doc_labels) - 1)], -1)

    def tokenizer(self):
        from rho1.data.tokenizer import load_tokenizer

        if not (self.path / "tokenizer").is_dir():
            raise ValueError(f"TokenStore {self.path} has lost its tokenizer/ folder; recreate the store with "
                             "`rho1 prepare` (--overwrite)")
        return load_tokenizer(self.path / "tokenizer")

    def num_windows(self, seq_len: int) -> int:
        return num_windows(self.n_tokens, seq_len)

    def check(self) -> TokenStore:
        """What every open does, at the same cost for a million or a billion tokens: sizes and times against the
        record made when the store was written (a changed file is hashed in full), and the largest token id
        recorded then against the vocabulary. A store written before the record was kept is verified in full
        once, and the record made."""
        how = "recreate it with `rho1 prepare`"
        if "files" not in self.manifest or "max_token_id" not in self.manifest:
            return self.verify(renew=True)
        renew_file_record(self.path, self.manifest, check_files(self.path, self.manifest, "TokenStore", how))
        self._check_largest(self.manifest["max_token_id"])
        return self

    def verify(self, renew: bool = False) -> TokenStore:
        """The full check (`rho1 verify`): every file against its hash, every token id against the vocabulary."""
        verify_files(self.path, self.manifest, "TokenStore", "recreate it with `rho1 prepare`")
        largest = max((int(self.tokens[i : i + (1 << 24)].max()) for i in range(0, self.n_tokens, 1 << 24)), default=-1)
        self._check_largest(largest)
        if renew and is_main_process():
            self.manifest["max_token_id"] = largest
            renew_file_record(self.path, self.manifest, list(self.manifest.get("sha256", {})))
        return self

    def _check_largest(self, largest: int) -> None:
        if largest >= self.vocab_size:
            raise ValueError(f"TokenStore {self.path} holds token id {largest} but its manifest says vocab_size "
                             f"{self.vocab_size} (the manifest was edited or damaged); recreate it with `rho1 prepare`")


@dataclass
class ScoreStore:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, store: TokenStore | None = None) -> ScoreStore:
        """Open a ScoreStore; with ``store``, refuse scores that belong to another corpus or tokenizer."""
        path = Path(path)
        scores = cls(path, read_manifest(path, "ScoreStore", SCORE_FORMAT))
        if not scores.manifest.get("complete"):
            raise ValueError(f"ScoreStore {path} is incomplete; run the same `rho1 score` command again to finish it")
        if store is not None:
            scores.check_matches(store)
        return scores

    def check_matches(self, store: TokenStore) -> None:
        m = self.manifest
        if m["tokenizer_hash"] != store.tokenizer_hash:
            raise ValueError(
                f"scores {self.path} were made with another tokenizer than TokenStore {store.path}; "
                f"score this store with `rho1 score --data {store.path}`"
            )
        if m["token_store_hash"] != store.hash:
            raise ValueError(
                f"scores {self.path} belong to another corpus than TokenStore {store.path} "
                f"(hash {m['token_store_hash']} vs {store.hash}); score this store with `rho1 score --data {store.path}`"
            )
        if m["n_tokens"] != store.n_tokens:
            raise ValueError(
                f"scores {self.path} count {m['n_tokens']:,} tokens but TokenStore {store.path} holds {store.n_tokens:,} "
                "(a manifest edited or damaged); score this store again with `rho1 score` into a new --out"
            )

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    def check(self) -> ScoreStore:
        """The cheap check at open (as TokenStore.check); scores written before the record was kept are hashed
        in full once."""
        how = "delete it and run `rho1 score` again"
        if "files" not in self.manifest:
            return self.verify(renew=True)
        renew_file_record(self.path, self.manifest, check_files(self.path, self.manifest, "ScoreStore", how))
        return self

    def verify(self, renew: bool = False) -> ScoreStore:
        """The full check (`rho1 verify`): every file against its hash."""
        verify_files(self.path, self.manifest, "ScoreStore", "delete it and run `rho1 score` again")
        if renew and is_main_process():
            renew_file_record(self.path, self.manifest, list(self.manifest.get("sha256", {})))
        return self

    @cached_property
    def scores(self) -> np.ndarray:
        return open_memmap(self.path / "scores.bin", np.float16, self.manifest["n_tokens"], "ScoreStore")


def verify_stores(paths: list[str], progress: bool = True) -> list:
    """`rho1 verify`: each store checked in full (a TokenStore's ids too), one line each; the first that fails
    is one sentence."""
    checked = []
    for path in paths:
        manifest_path = Path(path) / "manifest.json"
        fmt = read_json(manifest_path).get("format") if manifest_path.is_file() else None
        if fmt == SCORE_FORMAT:
            store = ScoreStore.open(path)
        else:  # a TokenStore, or one sentence saying what the folder is not
            store = TokenStore.open(path)
        store.verify(renew=True)
        checked.append(store)
        if progress:
            count = store.manifest["n_tokens"]
            print(f"verify: {path}: {type(store).__name__} of {count:,} tokens, every file matches its hash"
                  + (", every token id below the vocabulary size" if isinstance(store, TokenStore) else ""))
    return checked


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | Path, flag: str = "--out", folder: bool = True) -> None:
    """One sentence, before any work, when ``path`` cannot become the folder (or file) a stage writes."""
    path = Path(path)
    if path.exists() and folder != path.is_dir():
        raise ValueError(f"{flag} {path} is an existing {'file' if folder else 'folder'}; pass "
                         f"{'a folder' if folder else 'a file'} path instead")
    probe = path if folder and path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path} cannot be created: {probe} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be written ({probe}: {(err.strerror or str(err)).lower()}); "
                         f"choose a folder you can write to") from None


def open_with_scores(data: str, scores: str | None, seq_len: int, verb: str = "train") -> tuple[TokenStore, ScoreStore | None]:
    """A TokenStore and its ScoreStore (when given), checked to belong together and to use ``seq_len``."""
    store = TokenStore.open(data).check()
    score_store = ScoreStore.open(scores, store).check() if scores else None
    if score_store is not None and score_store.manifest.get("mean_loss") is None and store.n_tokens > 1:
        raise ValueError(f"scores {score_store.path} hold no finite score (every token's reference loss is NaN), so "
                         f"nothing could be selected; score the store again with `rho1 score --data {store.path}`")
    if score_store is not None and score_store.seq_len != seq_len:
        raise ValueError(f"scores {score_store.path} were computed with windows of {score_store.seq_len} tokens but "
                         f"--seq-len is {seq_len}; {verb} with --seq-len {score_store.seq_len} or rescore with "
                         f"--seq-len {seq_len}")
    return store, score_store
