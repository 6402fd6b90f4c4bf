"""`rho1 score`: a reference model's per-token losses of a TokenStore."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_choice, check_not_self, check_positive, check_seq_len
from rho1.config.options import (
    PRECISIONS,
    TRAIN_ON,
    opt,
)


@dataclass
class ScoreConfig:
    data: str = opt("", "TokenStore to score")
    model: str = opt("", "reference model: a checkpoint folder such as RUN/final, or a hub name")
    out: str = opt("scores", "ScoreStore folder to write", short="-o")
    seq_len: int = opt(256, "window length; must match training")
    batch_size: int = opt(32, "windows per forward")
    precision: str = opt("no", "compute dtype of the model and its loss", choices=PRECISIONS)
    chunk_windows: int = opt(256, "windows per unit of work (split across processes, resumed after a kill)")
    train_on: str = opt("all", "all: score every token; target: only the target tokens (NaN elsewhere, so they are "
                        "never selected)", choices=TRAIN_ON)
    cross_tokenizer: bool = opt(False, "the reference has another tokenizer: score the text of each window with it "
                                "and project its losses onto the store's tokens through byte offsets")
    trust_remote_code: bool = opt(False, "run a model's own code from the hub")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")

    def check(self) -> None:
        if not self.data or not self.model:
            raise ValueError("rho1 score needs --data TOKEN_STORE and --model REFERENCE_MODEL")
        check_not_self("--model", self.model, "rho1 score")
        check_seq_len(self.seq_len)
        check_positive(self, "seq_len", "batch_size", "chunk_windows", "threads")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("train_on", self.train_on, TRAIN_ON)
