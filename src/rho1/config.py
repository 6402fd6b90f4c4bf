"""Every stage's options, one dataclass each, and their checks.

This module imports nothing heavy (no torch, transformers or matplotlib), so `rho1 --help` and every
refusal of a bad option answer at once, before a model is loaded. The stage modules import their config
from here (``from rho1.train import TrainConfig`` still works).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

SCORE_NAMES = ("excess", "reference", "learner", "random")
PRECISIONS = ("no", "bf16", "fp16")
MODEL_PRESETS = {  # sized for CPU: nano for tests (seconds), tiny for the demo, small for calibration runs
    "nano": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
}


class Interrupted(Exception):
    """Ctrl-C during a stage, with what was kept and how to continue (one line, no traceback)."""


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0) or ratio != ratio:
        raise ValueError(
            f"selection ratio must be in (0, 1], got {ratio}; pass e.g. 0.6 to train on the top 60% of tokens"
        )
    return ratio


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_positive(cfg, *names: str, allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and (value < 0 or (value == 0 and name not in allow_zero)):
            what = "0 or more" if name in allow_zero else "positive"
            raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def check_seq_len(seq_len: int | None) -> None:
    # a window of one token has nothing to predict: every loss would be a mean over zero tokens
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (a window of one token has no next token to predict), "
                         f"got {seq_len}")


@dataclass
class PrepareConfig:
    sources: list[str] = field(default_factory=list)
    out: str = "store"
    tokenizer: str | None = None  # HF name or path, or another TokenStore whose tokenizer to reuse
    train_tokenizer: int | None = None  # vocabulary size of a byte-level BPE trained on these sources
    text_field: str | None = None
    template: str | None = None  # "\n" and "\t" written as two characters are read as newline and tab
    target_field: str | None = None
    split: str = "train"  # the split read from Hugging Face datasets (saved folders, hf:NAME)
    trust_remote_code: bool = False
    overwrite: bool = False  # replace an existing TokenStore at `out` (never any other file or folder)
    batch_docs: int = 512

    def check(self) -> None:
        if not self.sources:
            raise ValueError("no sources given; pass text files, folders, .jsonl or .parquet files to prepare")
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("pass exactly one of --tokenizer NAME_OR_PATH or --train-tokenizer VOCAB_SIZE")
        check_positive(self, "batch_docs")


@dataclass
class ScoreConfig:
    data: str = ""
    model: str = ""
    out: str = "scores"
    seq_len: int = 256
    batch_size: int = 32
    precision: str = "no"  # no | bf16 | fp16
    chunk_windows: int = 256  # windows per chunk: the unit of work split across processes and resumed
    trust_remote_code: bool = False
    threads: int | None = None  # CPU threads per process (default: see rho1.threads)

    def check(self) -> None:
        if not self.data or not self.model:
            raise ValueError("rho1 score needs --data TOKEN_STORE and --model REFERENCE_MODEL")
        check_seq_len(self.seq_len)
        check_positive(self, "seq_len", "batch_size", "chunk_windows", "threads")
        check_choice("precision", self.precision, PRECISIONS)


@dataclass
class TrainConfig:
    data: str = ""  # TokenStore to train on
    out: str = "runs/train"
    objective: str = "clm"  # clm | slm
    scores: str | None = None  # ScoreStore of `data` (needed for slm, optional for clm: logs what slm would keep)
    reference: str | None = None  # instead of --scores: a reference model whose losses are computed in the loop
    ratio: float = 0.6
    score: str = "excess"  # excess | reference | learner | random
    selection_scope: str = "micro"  # micro: rank each process's micro-batch; global: all processes' at once
    model: str | None = None  # HF name or path to start from; else a fresh --model-preset
    model_preset: str = "tiny"
    trust_remote_code: bool = False
    seq_len: int = 256
    batch_size: int = 16  # windows per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_tokens: int = 1_000_000
    seed: int = 0
    precision: str = "no"  # no | bf16 | fp16
    eval_data: list[str] = field(default_factory=list)
    eval_scores: list[str] = field(default_factory=list)  # ScoreStores of eval_data, same order ("" for none)
    eval_every: int = 0  # tokens; 0 = only at the start and the end
    eval_max_windows: int = 0  # 0 = every window of each eval store
    save_every: int = 0  # tokens; 0 = only the final checkpoint
    keep_last: int = 3  # checkpoints kept under checkpoints/ (older ones are deleted); 0 keeps all
    resume: bool = False  # continue from the newest complete checkpoint in `out`
    skip_nonfinite: bool = False  # skip a step whose loss or gradient is NaN/inf instead of stopping
    log_every: int = 1  # steps
    # auto: the loss from the LM head's input in chunks (no [tokens x vocab] logits, no head backward for
    # unselected tokens) when the model's logits are a plain linear head; logits: always the full logits
    loss_impl: str = "auto"
    threads: int | None = None  # CPU threads per process (default: see rho1.threads)

    def check(self) -> None:
        if not self.data:
            raise ValueError("rho1 train needs --data TOKEN_STORE (made by `rho1 prepare`)")
        check_choice("objective", self.objective, ("clm", "slm"))
        check_ratio(self.ratio)
        check_choice("score", self.score, SCORE_NAMES)
        check_choice("selection_scope", self.selection_scope, ("micro", "global"))
        check_choice("model_preset", self.model_preset, tuple(MODEL_PRESETS))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("loss_impl", self.loss_impl, ("auto", "logits"))
        if self.scores and self.reference:
            raise ValueError("pass either --scores (stored reference losses) or --reference (a reference model run in "
                             "the loop), not both")
        if self.objective == "slm" and not (self.scores or self.reference) and self.score in ("excess", "reference"):
            raise ValueError(f"--objective slm with --score {self.score} needs reference losses; pass --scores "
                             "SCORE_STORE (made by `rho1 score`) or --reference MODEL")
        if self.eval_scores and len(self.eval_scores) != len(self.eval_data):
            raise ValueError(f"--eval-scores names {len(self.eval_scores)} stores but --eval-data "
                             f"{len(self.eval_data)}; give one per eval store, '' where there is none")
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "grad_accum", "seq_len", "max_tokens", "log_every", "threads")
        check_positive(self, "eval_every", "eval_max_windows", "save_every", "keep_last", "warmup_steps",
                       "weight_decay", "grad_clip", allow_zero=("eval_every", "eval_max_windows", "save_every",
                                                                "keep_last", "warmup_steps", "weight_decay",
                                                                "grad_clip"))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EvalConfig:
    model: str = ""
    data: list[str] = field(default_factory=list)  # held-out TokenStores
    scores: list[str] = field(default_factory=list)  # their ScoreStores, same order ("" for none)
    answers: str | None = None  # GSM8K-style jsonl: few-shot answer accuracy
    shots: int = 0
    exemplars: str | None = None
    limit: int = 0
    max_new_tokens: int = 256
    generations: str | None = None
    ratio: float = 0.6
    seq_len: int | None = None  # default: the ScoreStores', else 256
    batch_size: int = 16
    trust_remote_code: bool = False
    threads: int | None = None

    def check(self) -> None:
        if not self.model:
            raise ValueError("rho1 eval needs --model (a checkpoint folder such as RUN/final, or a hub name)")
        if not (self.data or self.answers):
            raise ValueError("rho1 eval needs --data HELDOUT_STORE (losses) and/or --answers FILE.jsonl (accuracy)")
        if self.scores and len(self.scores) != len(self.data):
            raise ValueError("--scores must name one ScoreStore per --data store ('' for none)")
        check_ratio(self.ratio)
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "max_new_tokens", "threads")
        check_positive(self, "shots", "limit", allow_zero=("shots", "limit"))


@dataclass
class AnswerConfig:
    answers: str = ""  # jsonl with question / answer
    shots: int = 0
    exemplars: str | None = None  # jsonl of solved problems for the prompts (default: the first `shots` records,
    #                               which are then left out of the evaluation)
    limit: int = 0  # evaluate the first N problems (0 = all)
    max_new_tokens: int = 256
    batch_size: int = 16
    out: str | None = None  # JSONL of every prompt, generation, extracted and gold answer


@dataclass
class SweepConfig:
    train: TrainConfig = field(default_factory=TrainConfig)  # data, scores, model, budget, eval_data ...
    out: str = "runs/sweep"
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0])
    score_functions: list[str] = field(default_factory=lambda: list(SCORE_NAMES))
    ablation_ratio: float = 0.6  # the ratio the score functions are compared at
    target: str | None = None  # eval metric, default: the first eval store's target_loss (else loss)
    answers: str | None = None  # GSM8K-style jsonl: also the answer accuracy of each run's final model
    shots: int = 2  # exemplars per prompt (the first `shots` problems of `answers`, left out)
    answers_limit: int = 100

    def check(self) -> None:
        for r in [*self.ratios, self.ablation_ratio]:
            check_ratio(r)
        for s in self.score_functions:
            check_choice("score_functions", s, SCORE_NAMES)
        if not self.train.eval_data:
            raise ValueError("rho1 sweep compares held-out losses: pass --eval-data HELDOUT_STORE (with --eval-scores)")
        check_positive(self, "shots", "answers_limit", allow_zero=("shots",))


@dataclass
class DynamicsConfig:
    run: str = ""  # run directory of `rho1 train` (checkpoints/ and final/)
    data: str = ""  # held-out TokenStore
    out: str | None = None  # default RUN/dynamics
    seq_len: int | None = None  # default: the run's
    batch_size: int = 16
    max_windows: int = 64  # windows of the held-out store evaluated (0 = all)
    threshold: float = 0.2
    include_start: bool = True  # the model the run started from (its --model) as the first checkpoint
    examples: int = 4  # example trajectories per fluctuating class
    threads: int | None = None

    def check(self) -> None:
        if not self.run or not self.data:
            raise ValueError("rho1 dynamics needs a run folder and --data HELDOUT_STORE")
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "threads")
        check_positive(self, "max_windows", "threshold", "examples", allow_zero=("max_windows", "examples"))


@dataclass
class ViewConfig:
    data: str = ""  # TokenStore whose text is shown
    model: list[str] = field(default_factory=list)  # one model, or several checkpoints side by side
    scores: str | None = None  # ScoreStore of `data` with the reference losses, or:
    reference: str | None = None  # a reference model whose losses are computed here (e.g. for held-out text)
    out: str = "view.html"
    ratio: float = 0.6
    seq_len: int | None = None  # default: the ScoreStore's, else 256
    windows: int = 2  # windows of seq_len tokens shown
    start: int = 0  # first window shown
    batch_size: int = 16

    def check(self) -> None:
        check_ratio(self.ratio)
        check_seq_len(self.seq_len)
        check_positive(self, "windows", "batch_size")
        check_positive(self, "start", allow_zero=("start",))


@dataclass
class ReportConfig:
    runs: list[str] = field(default_factory=list)
    out: str = "report.html"
    target: str | None = None  # eval metric for curves and efficiency, e.g. eval/heldout/target_loss (default: found)
    baseline: str | None = None  # run name (folder) efficiency is measured against (default: first CLM run)

    def check(self) -> None:
        if not self.runs:
            raise ValueError("rho1 report needs at least one run folder of `rho1 train`")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    model_preset: str = "tiny"
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 2e-3
    ratio: float = 0.6
    base_tokens: int = 300_000  # > 0: pretrain a base model on the web corpus; reference, CLM and SLM start from it
    reference_tokens: int = 300_000
    train_tokens: int = 500_000
    eval_points: int = 14
    n_reference: int = 3000
    n_web: int = 3500
    n_heldout: int = 250
    n_offtarget: int = 150
    math_share: float = 0.35  # share of web pages with a worked problem
    wrong_share: float = 0.5  # share of those whose worked answer has a mistake
    accuracy_problems: int = 100  # held-out problems for answer accuracy (2-shot, greedy); 0 = skip
    threads: int | None = None

    def check(self) -> None:
        check_ratio(self.ratio)
        check_choice("model_preset", self.model_preset, tuple(MODEL_PRESETS))
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "train_tokens", "reference_tokens", "eval_points", "threads")


DEMO_PRESETS = {
    "default": DemoConfig(),
    "quick": DemoConfig(model_preset="nano", vocab_size=512, seq_len=128, base_tokens=20_000, reference_tokens=40_000,
                        train_tokens=60_000, eval_points=4, n_reference=300, n_web=400, n_heldout=40, n_offtarget=20,
                        accuracy_problems=10),
}


# ---- reading options from YAML files and the command line ----

def _type_name(tp) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value, tp, key: str, where: str):
    """``value`` as the field type ``tp`` (int, float, str, bool, X | None, list[X]), or one sentence."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key, where) for v in items]
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        if isinstance(value, str):  # "50_000_000", "1e6"
            text = value.replace("_", "")
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    ok = False
        if ok and isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = ok and isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        try:
            ok = not isinstance(value, bool) and isinstance(value, (int, float, str))
            value = float(value) if ok else value
        except ValueError:
            ok = False
    elif tp is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise ValueError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def config_from_dict(config_cls, data: dict, where: str, base=None):
    """A config from a mapping of option: value (keys as fields, ``model_preset``, or as options,
    ``model-preset``), each value checked against the field's type; unknown keys are refused."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in fields(config_cls)]
    values = {f.name: getattr(base, f.name) for f in fields(config_cls)} if base is not None else {}
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in names:
            raise ValueError(f"{where} has an unknown key {raw_key!r}; valid keys: "
                             f"{', '.join(n.replace('_', '-') for n in names)}")
        values[key] = _coerce(value, hints[key], raw_key, where)
    return config_cls(**values)


def load_yaml(path: str) -> dict:
    """A YAML file of option: value, or one sentence saying what is wrong with it."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path} does not exist" if not p.exists() else f"config file {path} is not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ValueError(f"config file {path} is not valid YAML{at} ({problem}); write one `option: value` "
                         "per line") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, one per line")
    return data
