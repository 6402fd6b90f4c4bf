"""Reading documents from text sources: .txt files or folders, .jsonl, Parquet, and saved HF datasets.

Each source yields ``Document(text, target_start, label)``: ``target_start`` is the character where the
part that counts for target-domain metrics begins (e.g. the answer of a question/answer template),
or None when the whole text counts; ``label`` names the document's source (``--label-field``), or None.
A conversation rendered with a chat template (``--chat-field``) has ``target_spans`` instead: the
character ranges of its assistant turns.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


@dataclass
class Document:
    text: str
    target_start: int | None = None
    label: str | None = None
    target_spans: list[tuple[int, int]] | None = None  # [start, end) characters of the target (assistant turns)


def chat_renderer(tokenizer, field: str):
    """``render(record, where) -> Document`` of the conversation in ``record[field]`` (a list of {role, content}),
    as the tokenizer's chat template writes it; the assistant turns are the target. Each turn's characters
    are found by rendering the conversation up to it: the conversation before it with the generation prompt,
    then with the turn (so the turn's end-of-turn marker is target, its header is not)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-field renders conversations with the tokenizer's chat template, and this tokenizer "
                         "has none; pass --tokenizer with a chat model's tokenizer (or set its chat_template), or "
                         "format the records with --template")

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("--chat-field finds the assistant turns through a fast tokenizer's character offsets, and "
                         "this tokenizer is a slow (Python) one; pass a tokenizer with a tokenizer.json")

    def render(messages, where: str = "", **kw) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        except Exception as err:  # jinja2's TemplateError, raise_exception() of a template (roles must alternate...)
            raise ValueError(f"{where}: the chat template refused this conversation ({' '.join(str(err).split())[:200]}"
                             "); fix the record or use another template") from None

    def document(record: dict, where: str) -> Document:
        if field not in record:
            raise ValueError(f"{where} has no field {field!r} for --chat-field; fields present: {', '.join(record)}")
        messages = record[field]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{where} field {field!r} must be a list of messages, each {{\"role\": ..., "
                             "\"content\": \"text\"}")
        text, spans = render(messages, where), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            through = render(messages[: i + 1], where)
            before = render(messages[:i], where, add_generation_prompt=True) if i else _opening(through)
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError(f"{where}: the chat template does not write this conversation turn by turn (the "
                                 "text up to an assistant turn changes once later turns follow, as templates that "
                                 "drop earlier reasoning do), so its assistant turns cannot be found; use another "
                                 "template or one conversation per turn")
            spans.append((len(before), len(through)))
        return Document(text, target_spans=spans)

    def _opening(through: str) -> str:
        """What the template writes before an opening assistant turn (a BOS, a default system prompt, the
        turn's header): the empty conversation's generation prompt, when the turn starts with it."""
        try:
            opening = render([], add_generation_prompt=True)
        except ValueError:
            return ""
        return opening if through.startswith(opening) else ""

    return document


HF_PREFIX = "hf:"  # hf:NAME[:CONFIG] -> datasets.load_dataset(NAME, CONFIG): a hub name or a local data folder


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                       and (path / "dataset_info.json").is_file())


def expand_sources(paths: list[str | Path]) -> list[Path | str]:
    """Files named directly, the readable files under any folder (in sorted order), saved Hugging Face
    datasets (folders) and ``hf:NAME`` sources as they are."""
    files: list[Path | str] = []
    for raw in paths:
        if isinstance(raw, str) and raw.startswith(HF_PREFIX):
            files.append(raw)
            continue
        path = Path(raw)
        if path.is_dir() and is_saved_dataset(path):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"folder {path} has no {'/'.join(SUFFIXES)} files; point to the files themselves")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.is_symlink():
            raise ValueError(f"source {path} is a symbolic link that leads nowhere (a loop, or its target is gone); "
                             "point to the file itself")
        else:
            raise FileNotFoundError(f"source {path} does not exist; check the path")
    return files


def _guess_encoding(path: Path) -> str:
    """What a file that is not UTF-8 most likely is: UTF-16 by its byte-order mark, else Windows-1252 (which
    decodes far more real files than Latin-1 does correctly: curly quotes, dashes and the euro sign)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    try:
        head.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin1"


def _not_utf8(path: Path, offset: int) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text (bad byte at offset {offset}); convert it first, e.g. "
                      f"iconv -f {_guess_encoding(path)} -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start) from None


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def format_record(record: dict, where: str, text_field: str | None, template: str | None,
                  target_field: str | None) -> Document:
    """One record (a jsonl line, a Parquet or dataset row) to a Document."""
    if template is not None:
        missing = [f for f in _template_fields(template) if f not in record]
        if missing:
            raise ValueError(
                f"{where} has no field {missing[0]!r} used by --template; fields present: {', '.join(record)}"
            )
        text = template.format(**record)
        target_start = None
        if target_field is not None:
            marker = "{" + target_field + "}"
            if marker not in template:
                raise ValueError(f"--target-field {target_field!r} does not appear in --template as {marker}")
            target_start = len(template[: template.index(marker)].format(**record))
        return Document(text, target_start)
    field = text_field or "text"
    if field not in record:
        raise ValueError(
            f"{where} has no field {field!r}; pass --text-field with one of: {', '.join(record)} (or --template)"
        )
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where} field {field!r} is {type(value).__name__}, not text")
    return Document(value, 0 if target_field == field else None)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record), read a line at a time: a corpus bigger than memory streams through."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start) from None
            offset += len(raw)
            if line.strip():
                yield lineno, _json_record(path, lineno, line)


def _json_record(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {lineno} is not valid JSON ({err.msg}); fix or remove that line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {lineno} is not a JSON object; each line must be {{\"field\": ...}}")
    return record


def read_jsonl_records(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a jsonl file, each checked to have the ``required`` fields."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    records = []
    for lineno, record in _jsonl_lines(Path(path)):
        missing = [f for f in required if f not in record]
        if missing:
            raise ValueError(f"{path} line {lineno} has no field {missing[0]!r}; fields present: {', '.join(record)}")
        records.append(record)
    return records


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as table:  # a batch of rows at a time: files bigger than memory stream through
        rows = (record for batch in table.iter_batches(batch_size=1024) for record in batch.to_pylist())
        for i, record in enumerate(rows):
            yield f"{path} row {i}", record


def load_hf_dataset(source: Path | str, split: str = "train"):
    """One split of a saved dataset folder, or of ``hf:NAME[:CONFIG]`` through ``datasets.load_dataset``
    (a hub name needs a network; a local data folder does not). Never runs dataset loading scripts."""
    import datasets

    if isinstance(source, Path):
        data = datasets.load_from_disk(str(source))
    else:
        name, _, config = source[len(HF_PREFIX):].partition(":")
        try:
            data = datasets.load_dataset(name, config or None, split=split)
        except ValueError as err:
            if "split" not in str(err).lower():
                raise
            found = " ".join(str(err).split())[:200]
            raise ValueError(f"dataset {source} has no split {split!r} ({found}); pass --split with one of its "
                             "splits") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset {source} has no split {split!r}; pass --split with one of: {', '.join(data)}")
        data = data[split]
    return data


def _records(path, split: str) -> Iterator[tuple[str, dict]] | None:
    """(where, record) of a record source (jsonl, Parquet, HF dataset); None for a text file."""
    if isinstance(path, str) or is_saved_dataset(path):
        return ((f"dataset {path} ({split}) row {i}", r) for i, r in enumerate(load_hf_dataset(path, split)))
    if path.suffix in (".jsonl", ".json"):
        return ((f"{path} line {lineno}", r) for lineno, r in _jsonl_lines(path))
    if path.suffix == ".parquet":
        return _parquet_records(path)
    return None


def _label(record: dict, label_field: str, where: str) -> str:
    if label_field not in record:
        raise ValueError(f"{where} has no field {label_field!r} for --label-field; fields present: {', '.join(record)}")
    return str(record[label_field])


def read_documents(paths: list[str | Path], text_field: str | None = None, template: str | None = None,
                   target_field: str | None = None, split: str = "train",
                   label_field: str | None = None, chat=None) -> Iterator[Document]:
    """Every document of every source, in order. Empty documents are skipped. ``split``: the split read
    from Hugging Face datasets. ``label_field``: each record's field naming its source (a text file's
    documents are labelled by the file's name). ``chat``: a ``chat_renderer`` for records holding
    conversations."""
    for path in expand_sources(paths):
        records = _records(path, split)
        if records is None and chat is not None:
            raise ValueError(f"--chat-field reads conversations from records (jsonl, Parquet, datasets); {path} is a "
                             "text file")
        if records is None:
            docs = iter([Document(_read_utf8(path), 0 if target_field else None,
                                  Path(path).name if label_field else None)])
        elif chat is not None:
            docs = (_labelled(chat(r, where), r, label_field, where) for where, r in records)
        else:
            docs = (_labelled(format_record(r, where, text_field, template, target_field), r, label_field, where)
                    for where, r in records)
        for doc in docs:
            if doc.text.strip():
                yield doc


def _labelled(doc: Document, record: dict, label_field: str | None, where: str) -> Document:
    if label_field:
        doc.label = _label(record, label_field, where)
    return doc
