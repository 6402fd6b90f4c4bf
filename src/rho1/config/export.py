"""`rho1 export`: a static selection as windows with labels, for any trainer."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_choice, check_not_self, check_positive, check_ratio, check_seq_len
from rho1.config.options import (
    PRECISIONS,
    TRAIN_ON,
    TRAIN_ON_HELP,
    _rules,
    _scores,
    opt,
)
from rho1.selection.rules import check_rule_options
from rho1.selection.scores import SCORES


@dataclass
class ExportConfig:
    data: str = opt("", "TokenStore to export")
    scores: str | None = opt(None, "its ScoreStore (from `rho1 score` with the reference model)")
    model: str = opt("", "the fixed model the excess loss is measured against: the starting model of the planned run")
    out: str = opt("", "new folder: Parquet shards, a `datasets` folder (load_from_disk) and manifest.json",
                   short="-o")
    ratio: float = opt(0.6, "fraction of tokens kept, in (0, 1]")
    score: str = opt("excess", "selection score (see rho1.register_score)", choices=_scores)
    rule: str = opt("topk", "topk, soft, threshold or your own (rho1.register_rule)", choices=_rules)
    temperature: float = opt(0.25, "soft rule: sigmoid temperature in nats of score")
    threshold: float = opt(0.0, "threshold rule: keep the tokens scoring above it (nats), at most --ratio of them")
    weights: bool = opt(False, "also write a 'weights' column (always written for a soft rule)")
    seq_len: int | None = opt(None, "window length (default: the ScoreStore's, else 256)")
    batch_size: int = opt(16, "windows ranked together, as one micro-batch of `rho1 train --batch-size`")
    selection_scope: str = opt("group", "group: rank each group of --batch-size windows (as `rho1 train` ranks a "
                               "micro-batch); dataset: rank every token of the store at once (Token Cleaning's "
                               "global ranking)", choices=("group", "dataset"))
    train_on: str = opt("all", TRAIN_ON_HELP, choices=TRAIN_ON)
    seed: int = opt(0, "window order, as `rho1 train --seed` (the export is written in that order)")
    shard_windows: int = opt(8192, "windows per Parquet shard")
    precision: str = opt("no", "compute dtype of the model's losses", choices=PRECISIONS)
    trust_remote_code: bool = opt(False, "run a model's own code from the hub")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")

    def check(self) -> None:
        if not self.data or not self.model or not self.out:
            raise ValueError("rho1 export needs --data TOKEN_STORE, --model MODEL (the run's starting model) and "
                             "--out NEW_FOLDER (with --scores SCORE_STORE for the excess loss)")
        check_not_self("--model", self.model, "rho1 export")
        check_ratio(self.ratio)
        check_choice("score", self.score, tuple(SCORES))
        check_rule_options(self.rule, self.temperature, self.threshold)
        if not self.scores and SCORES[self.score].needs_reference:
            raise ValueError(f"--score {self.score} needs reference losses; pass --scores SCORE_STORE (made by "
                             "`rho1 score`)")
        check_seq_len(self.seq_len)
        check_positive(self, "seq_len", "batch_size", "shard_windows", "threads")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("selection_scope", self.selection_scope, ("group", "dataset"))
        check_choice("train_on", self.train_on, TRAIN_ON)

    @property
    def rule_options(self) -> dict:
        return {"temperature": self.temperature, "threshold": self.threshold}
