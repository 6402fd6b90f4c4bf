"""`rho1 prepare`: text sources into a TokenStore."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_positive
from rho1.config.options import (
    opt,
)


@dataclass
class PrepareConfig:
    sources: list[str] = opt(factory=list, help=".txt/.md files or folders, .jsonl, .parquet, folders written by "
                             "datasets' save_to_disk, or hf:NAME[:CONFIG] (datasets.load_dataset)", positional=True)
    out: str = opt("store", "TokenStore folder to write; an existing TokenStore is replaced only with --overwrite",
                   short="-o")
    tokenizer: str | None = opt(None, "HF tokenizer name or path, or a TokenStore whose tokenizer to reuse")
    train_tokenizer: int | None = opt(None, "train a byte-level BPE of this vocabulary size on the sources",
                                      metavar="VOCAB_SIZE")
    text_field: str | None = opt(None, "jsonl/parquet field holding the text (default: text)")
    template: str | None = opt(None, 'format records, e.g. "Question: {question}\\nAnswer: {answer}" (a written '
                               "\\n or \\t is a newline or a tab)")
    target_field: str | None = opt(None, "template field whose tokens count for target-domain metrics")
    chat_field: str | None = opt(None, "jsonl/parquet field holding a conversation (a list of {role, content}), "
                                 "rendered with the tokenizer's chat template; the assistant turns are the target")
    label_field: str | None = opt(None, "record field naming each document's source (e.g. source); training then "
                                 "logs the share of each source's tokens selected. Text files: their file name")
    split: str = opt("train", "split read from Hugging Face datasets")
    trust_remote_code: bool = opt(False, "run a tokenizer's own code from the hub")
    overwrite: bool = opt(False, "replace an existing TokenStore at --out (ScoreStores made from it stop matching)")
    batch_docs: int = opt(512, "documents tokenized at once", cli=False)
    workers: int = opt(1, "tokenizing processes; the store is byte for byte the one a single process writes")

    def check(self) -> None:
        if not self.sources:
            raise ValueError("no sources given; pass text files, folders, .jsonl or .parquet files to prepare")
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("pass exactly one of --tokenizer NAME_OR_PATH or --train-tokenizer VOCAB_SIZE")
        check_positive(self, "batch_docs", "workers")
        if self.chat_field and (self.template or self.text_field or self.target_field):
            raise ValueError("--chat-field renders each record's conversation with the chat template; drop "
                             "--template, --text-field and --target-field (the assistant turns are the target)")
        if self.chat_field and self.train_tokenizer is not None:
            raise ValueError("--chat-field needs the chat template of an existing tokenizer; pass --tokenizer "
                             "NAME_OR_PATH instead of --train-tokenizer")
