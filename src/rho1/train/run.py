"""The state of one `rho1 train` run: what ``setup`` builds and ``fit`` moves (step, tokens, the next evaluation
and checkpoint), and the position a checkpoint records."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from rho1.config import TrainConfig
from rho1.data.loader import WindowOrder
from rho1.data.store import ScoreStore, TokenStore
from rho1.train.checkpoint import Checkpointer
from rho1.train.evaluator import Evaluator
from rho1.train.metrics import MetricsLog


@dataclass
class Run:
    """Everything one training run holds; ``step``, ``tokens``, ``next_eval`` and ``next_save`` move."""

    cfg: TrainConfig
    accelerator: Accelerator
    store: TokenStore
    scores: ScoreStore | None
    model: torch.nn.Module  # as accelerate prepared it
    optimizer: torch.optim.Optimizer
    order: WindowOrder
    reference: tuple | None  # (model, head_of) of a reference model run in the loop (--reference MODEL or self)
    chunked_head: bool  # the loss from the head's input (rho1.selection.linear_ce)
    evaluator: Evaluator
    checkpointer: Checkpointer
    log: MetricsLog
    resumed_from: Path | None = None
    train_seconds: float = 0.0  # wall time of this process's optimizer steps
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the --out lock, released by fit
    step: int = 0
    tokens: int = 0
    next_eval: float = math.inf
    next_save: float = math.inf
    parameters: int = 0
    flops_per_token: float = 0.0  # training FLOPs of one token (rho1.compute)
    head_backward: float = 0.0  # of which the head's backward, skipped for unselected tokens by the chunked loss
    train_flops: float = 0.0  # the model FLOPs of this process's optimizer steps
    flops: float = 0.0  # the model FLOPs of every optimizer step so far, all processes together (kept in checkpoints)
    load_peaks: dict = field(default_factory=dict)  # peak memory while the models were loaded (rho1.compute)
    peak: tuple = (None, "")  # peak FLOP/s of one device and where that number comes from
    keep: object = None  # 1 per stream position that may be trained on (--train-on target, --selection), or None

    @property
    def ratio(self) -> float:
        return self.cfg.ratio if self.cfg.objective == "slm" else 1.0

    @property
    def selecting(self) -> bool:  # slm with topk at ratio 1 keeps every token: exactly clm
        return self.cfg.objective == "slm" and (self.ratio < 1.0 or self.cfg.rule != "topk")

    @property
    def windows_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.cfg.seq_len

    @property
    def total_steps(self) -> int:
        return math.ceil(self.cfg.max_tokens / self.tokens_per_step)

    @property
    def name(self) -> str:
        cfg = self.cfg
        extra = [x for x in (cfg.score if cfg.score != "excess" else "", cfg.rule if cfg.rule != "topk" else "") if x]
        return f"{cfg.objective} ({', '.join(extra)})" if self.selecting and extra else cfg.objective

    def position(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops, "next_eval": self.next_eval, "next_save": self.next_save,
                "objective": self.cfg.objective, "ratio": self.ratio, "token_store_hash": self.store.hash,
                "tokens_per_step": self.tokens_per_step,
                "scores_hash": scores_hash(self.scores), "selection_hash": selection_hash(self.cfg.selection)}


def scores_hash(scores: ScoreStore | None) -> str | None:
    return None if scores is None else (scores.manifest.get("sha256") or {}).get("scores.bin")


def selection_hash(export: str | None) -> str | None:
    """An export's identity: its manifest names the store, scores, model, rule and ratio it was made with."""
    from rho1.data.store import sha256_file

    return None if not export else sha256_file(Path(export) / "manifest.json")
