"""Every stage's options, one dataclass each, and their checks.

This module imports nothing heavy (no torch, transformers or matplotlib), so `rho1 --help` and every
refusal of a bad option answer at once, before a model is loaded. The stage modules import their config
from here (``from rho1.train import TrainConfig`` still works).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from rho1.checks import (  # noqa: F401
    check_choice,
    check_not_self,
    check_positive,
    check_ratio,
    check_self_reference,
    check_seq_len,
)
from rho1.selection.rules import RULES, check_rule_options
from rho1.selection.scores import SCORES

PRECISIONS = ("no", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # accelerate's names, as transformers' --report-to
TRAIN_ON = ("all", "target")
TRAIN_ON_HELP = ("all: every token; target: only the tokens of --target-field or of the assistant turns (--chat-field), "
                 "the store's target_mask (the prompt is never trained on or selected)")
MODEL_PRESETS = {  # nano for tests (seconds), tiny for the demo, small and medium for CPU benchmarks, large for a GPU
    "nano": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "medium": dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=5, intermediate_size=896),  # ~9M
    "large": dict(hidden_size=640, num_hidden_layers=10, num_attention_heads=10, intermediate_size=1728),  # ~55M
    "xl": dict(hidden_size=1280, num_hidden_layers=24, num_attention_heads=20, intermediate_size=3456),  # ~0.48B
}


class Interrupted(Exception):
    """Ctrl-C during a stage, with what was kept and how to continue (one line, no traceback)."""


_ctrl_c = False


def on_ctrl_c(signum=None, frame=None):
    """The CLI's SIGINT handler: KeyboardInterrupt, as Python's own, and a flag that ``stop_if_ctrl_c`` reads,
    because Python drops an exception raised while a finalizer runs and the stage would go on to the end."""
    global _ctrl_c
    _ctrl_c = True
    raise KeyboardInterrupt


def stop_if_ctrl_c() -> None:
    """Raise KeyboardInterrupt if Ctrl-C came and its exception got lost (called between steps and chunks)."""
    if _ctrl_c:
        raise KeyboardInterrupt


def opt(default=MISSING, help: str = "", *, factory=None, **cli):
    """A config field with its command-line help; ``cli`` holds how the option is spelled when it is not
    ``--field-name`` (``flag``, ``short``, ``positional``, ``choices``, ``metavar``, ``cli=False``)."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _scores() -> tuple[str, ...]:
    return tuple(SCORES)


def _rules() -> tuple[str, ...]:
    return tuple(RULES)


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


@dataclass
class TrainConfig:
    data: str = opt("", "TokenStore to train on")
    out: str = opt("runs/train", "run folder", short="-o")
    objective: str = opt("clm", "clm: every token; slm: the selected tokens", choices=("clm", "slm"))
    scores: str | None = opt(None, "ScoreStore of --data (from `rho1 score`); with clm, logs what slm would keep")
    reference: str | None = opt(None, "instead of --scores: a reference model run in the loop, or self: the "
                                "learner's own starting weights (see --reference-ema, --reference-update)")
    reference_ema: float | None = opt(None, "with --reference self: the reference is a moving average of the "
                                      "learner's weights, ref = DECAY * ref + (1 - DECAY) * learner after each step",
                                      metavar="DECAY")
    reference_update: int = opt(0, "with --reference self: every N steps the reference becomes a copy of the learner "
                                "(a self-evolving reference; 0: never)", metavar="N")
    train_on: str = opt("all", TRAIN_ON_HELP, choices=TRAIN_ON)
    selection: str | None = opt(None, "train (clm) on the labels of an export of `rho1 export` of --data: a static "
                                "selection under rho1's own loop", metavar="EXPORT")
    cross_tokenizer: bool = opt(False, "--reference has another tokenizer: project its losses onto the store's tokens")
    ratio: float = opt(0.6, "fraction of tokens slm keeps, in (0, 1]")
    score: str | None = opt(None, "selection score (default excess = learner loss - reference loss; with --reference "
                            "self, retrospective = reference loss - learner loss, as ssToken; the others are "
                            "ablations or your own, see rho1.register_score)", choices=_scores)
    selection_scope: str = opt("micro", "rank each process's micro-batch (micro) or the same micro-batch of every "
                               "process at once (global)", choices=("micro", "global"))
    rule: str = opt("topk", "how scores become token weights: topk (the paper's), soft, threshold, or your own "
                    "(rho1.register_rule)", choices=_rules)
    temperature: float = opt(0.25, "soft rule: sigmoid temperature in nats of score (towards 0 it becomes topk)")
    threshold: float = opt(0.0, "threshold rule: keep the tokens scoring above it (nats), at most --ratio of them")
    model: str | None = opt(None, "HF causal LM name or path to start from (default: a fresh --model-preset model)")
    model_preset: str = opt("tiny", "size of the fresh model", choices=tuple(MODEL_PRESETS))
    trust_remote_code: bool = opt(False, "run a model's own code from the hub")
    seq_len: int = opt(256, "window length (tokens)")
    batch_size: int = opt(16, "windows per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay of matrices")
    grad_clip: float = opt(1.0, "gradient norm clip (0: none)")
    max_tokens: int = opt(1_000_000, "token budget (dropped tokens count as seen)")
    seed: int = opt(0, "model initialisation and data order (CLM and SLM with one seed see the same tokens)")
    precision: str = opt("no", "mixed precision", choices=PRECISIONS)
    eval_data: list[str] = opt(factory=list, help="held-out TokenStores")
    eval_scores: list[str] = opt(factory=list, help="ScoreStores of --eval-data, same order ('' for none)")
    eval_every: int = opt(0, "evaluate every N tokens (0: at the start and the end only)")
    eval_max_windows: int = opt(0, "held-out windows evaluated (0: all)")
    save_every: int = opt(0, "resumable checkpoint every N tokens (0: the final one only)")
    keep_last: int = opt(3, "resumable checkpoints kept (0: all, which `rho1 dynamics` needs)")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --out (same command plus this flag)")
    skip_nonfinite: bool = opt(False, "skip a step whose loss or gradient is NaN/inf instead of stopping")
    log_every: int = opt(1, "steps per metrics record (loss over all their selected tokens)")
    loss_impl: str = opt("auto", "auto: the loss from the head's input in chunks when the head is plain linear (less "
                         "memory, no head backward for unselected tokens); logits: full logits",
                         choices=("auto", "logits"))
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in the backward "
                                       "(non-reentrant): far less activation memory for about a third more compute")
    attn_implementation: str | None = opt(None, "attention kernel: sdpa, eager or flash_attention_2 (default: "
                                          "sdpa where the model supports it, else eager)", choices=ATTENTION)
    torch_compile: bool = opt(False, "compile each decoder layer with torch.compile (the selective loss stays eager)")
    report_to: list[str] = opt(factory=lambda: ["none"], help="experiment trackers the metrics also go to: "
                               "tensorboard, wandb, mlflow, trackio, all (those installed) or none",
                               choices=TRACKERS + ("all", "none"))
    peak_flops: float | None = opt(None, "peak FLOP/s of one device for MFU (default: the known bf16/fp32 peak of "
                                   "A100/H100/H200; on a CPU, measured once)")

    def check(self) -> None:
        if not self.data:
            raise ValueError("rho1 train needs --data TOKEN_STORE (made by `rho1 prepare`)")
        check_choice("attn_implementation", self.attn_implementation, (None, *ATTENTION))
        for name in self.report_to:
            check_choice("report_to", name, TRACKERS + ("all", "none"))
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError("--report-to none cannot be combined with a tracker; pass one or the other")
        if self.peak_flops is not None and not (self.peak_flops > 0 and math.isfinite(self.peak_flops)):
            raise ValueError(f"--peak-flops must be a positive number of FLOP/s (e.g. 989e12), got {self.peak_flops}")
        check_choice("objective", self.objective, ("clm", "slm"))
        check_ratio(self.ratio)
        check_choice("train_on", self.train_on, TRAIN_ON)
        self._check_self_reference()
        if self.score is None:  # resolved once, so RUN/config.yaml names the score used
            self.score = "retrospective" if self.reference == "self" else "excess"
        check_choice("score", self.score, tuple(SCORES))
        check_choice("selection_scope", self.selection_scope, ("micro", "global"))
        check_rule_options(self.rule, self.temperature, self.threshold)
        check_choice("model_preset", self.model_preset, tuple(MODEL_PRESETS))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("loss_impl", self.loss_impl, ("auto", "logits"))
        if self.cross_tokenizer and not self.reference:
            raise ValueError("--cross-tokenizer applies to --reference MODEL (a ScoreStore made with `rho1 score "
                             "--cross-tokenizer` needs nothing more); pass --reference or drop the flag")
        if self.scores and self.reference:
            raise ValueError("pass either --scores (stored reference losses) or --reference (a reference model run in "
                             "the loop), not both")
        if self.objective == "slm" and not (self.scores or self.reference) and SCORES[self.score].needs_reference:
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

        if self.selection and self.objective != "clm":
            raise ValueError("--selection trains on the labels an export kept, with the clm objective; drop "
                             "--objective slm (the export already is the selection)")
        if self.selection and (self.scores or self.reference):
            raise ValueError("--selection is a static selection made by `rho1 export`; drop --scores and --reference")

    def _check_self_reference(self) -> None:
        check_self_reference(self.reference == "self", self.reference_ema, self.reference_update)
        if self.reference == "self" and self.objective != "slm":
            raise ValueError("--reference self scores tokens for selection, which --objective clm does not do (it "
                             "trains on every token); pass --objective slm, or drop --reference self")
        if self.reference == "self" and self.cross_tokenizer:
            raise ValueError("--reference self is the learner itself, with its own tokenizer; drop --cross-tokenizer")

    @property
    def rule_options(self) -> dict:
        return {"temperature": self.temperature, "threshold": self.threshold}


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


@dataclass
class EvalConfig:
    model: str = opt("", "checkpoint folder (e.g. RUN/final) or hub name")
    data: list[str] = opt(factory=list, help="held-out TokenStores")
    scores: list[str] = opt(factory=list, help="their ScoreStores, same order ('' for none): splits the tokens into "
                            "the top --ratio of excess loss of the evaluated model and the rest")
    answers: str | None = opt(None, "GSM8K-style jsonl (question, answer ending in '#### N'): few-shot accuracy")
    shots: int = opt(0, "solved exemplars in each prompt")
    exemplars: str | None = opt(None, "jsonl the exemplars come from (default: the first --shots of --answers, left "
                                "out of the evaluation)")
    limit: int = opt(0, "evaluate the first N problems (0: all)")
    max_new_tokens: int = opt(256, "generation length")
    chat: bool = opt(False, "--answers: prompt with the model's chat template, the question as the user's turn and "
                     "each exemplar as an earlier exchange (as chat-tuned models expect), instead of 'Question: ... "
                     "Answer:'")
    generations: str | None = opt(None, "JSONL to write every prompt, generation, extracted and gold answer to")
    out: str | None = opt(None, "JSON file to write the results to (they are printed either way)", short="-o")
    ratio: float = opt(0.6, "fraction of tokens counted as selected")
    train_on: str = opt("all", "all: every token; target: only the target tokens count (loss and the selected "
                        "split)", choices=TRAIN_ON)
    seq_len: int | None = opt(None, "window length (default: the ScoreStores', else 256)")
    batch_size: int = opt(16, "windows (or prompts) per forward")
    trust_remote_code: bool = opt(False, "run a model's own code from the hub")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")

    def check(self) -> None:
        if not self.model:
            raise ValueError("rho1 eval needs --model (a checkpoint folder such as RUN/final, or a hub name)")
        if not (self.data or self.answers):
            raise ValueError("rho1 eval needs --data HELDOUT_STORE (losses) and/or --answers FILE.jsonl (accuracy)")
        check_not_self("--model", self.model, "rho1 eval")
        if self.scores and len(self.scores) != len(self.data):
            raise ValueError("--scores must name one ScoreStore per --data store ('' for none)")
        check_ratio(self.ratio)
        check_choice("train_on", self.train_on, TRAIN_ON)
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
    chat: bool = False  # prompt with the tokenizer's chat template (the question as the user's turn)


@dataclass
class SweepConfig:
    train: TrainConfig = opt(factory=TrainConfig, help="data, scores, model, budget, eval_data ...", cli=False)
    out: str = opt("runs/sweep", "sweep folder, one run per folder", short="-o")
    ratios: list[float] = opt(factory=lambda: [0.2, 0.4, 0.6, 0.8, 1.0], help="selection ratios of the excess-loss "
                              "runs")
    score_functions: list[str] = opt(factory=lambda: [s for s in SCORES if s != "retrospective"],
                                     help="score functions compared at --ablation-ratio (default: every registered "
                                     "one but retrospective, which is for --reference self)", choices=_scores)
    rules: list[str] = opt(factory=lambda: ["topk"], help="selection rules: topk at every ratio, each other rule "
                           "(with --temperature / --threshold) at --ablation-ratio", choices=_rules)
    ablation_ratio: float = opt(0.6, "the ratio score functions and rules are compared at (an excess-loss topk run "
                                "at it is added)")
    target: str | None = opt(None, "eval metric compared (default: the first eval store's target_loss)")
    answers: str | None = opt(None, "GSM8K-style jsonl: also each run's few-shot answer accuracy")
    shots: int = opt(2, "exemplars per prompt, the first problems of --answers")
    answers_limit: int = opt(100, "problems evaluated")

    def check(self) -> None:
        for r in [*self.ratios, self.ablation_ratio]:
            check_ratio(r)
        for s in self.score_functions:
            check_choice("score_functions", s, tuple(SCORES))
        for r in self.rules:
            check_rule_options(r, self.train.temperature, self.train.threshold)
        if not self.train.eval_data:
            raise ValueError("rho1 sweep compares held-out losses: pass --eval-data HELDOUT_STORE (with --eval-scores)")
        check_positive(self, "shots", "answers_limit", allow_zero=("shots",))


@dataclass
class DynamicsConfig:
    run: str = opt("", "run folder of `rho1 train` (saved with --save-every and --keep-last 0)", positional=True)
    data: str = opt("", "held-out TokenStore")
    out: str | None = opt(None, "output folder (default RUN/dynamics)", short="-o")
    seq_len: int | None = opt(None, "window length (default: the run's)")
    batch_size: int = opt(16, "windows per forward")
    max_windows: int = opt(64, "held-out windows evaluated (0: all)")
    threshold: float = opt(0.2, "|dL| above which a token is H->L or L->H")
    include_start: bool = opt(True, "leave out the model the run started from", flag="--no-start")
    examples: int = opt(4, "example trajectories plotted per fluctuating class")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")

    def check(self) -> None:
        if not self.run or not self.data:
            raise ValueError("rho1 dynamics needs a run folder and --data HELDOUT_STORE")
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "threads")
        check_positive(self, "max_windows", "threshold", "examples", allow_zero=("max_windows", "examples"))


@dataclass
class ViewConfig:
    data: str = opt("", "TokenStore whose text is shown (corpus or held-out)")
    model: list[str] = opt(factory=list, help="one model, or several checkpoints side by side (selection tendency)")
    scores: str | None = opt(None, "ScoreStore of --data (reference losses)")
    reference: str | None = opt(None, "instead of --scores: a reference model run on --data")
    out: str = opt("view.html", "HTML file to write", short="-o")
    ratio: float = opt(0.6, "fraction of tokens highlighted")
    seq_len: int | None = opt(None, "window length (default: the ScoreStore's, else 256)")
    windows: int = opt(2, "windows of --seq-len tokens shown")
    start: int = opt(0, "first window shown")
    batch_size: int = opt(16, "windows per forward")

    def check(self) -> None:
        check_not_self("--reference", self.reference, "rho1 view")
        check_ratio(self.ratio)
        check_seq_len(self.seq_len)
        check_positive(self, "windows", "batch_size")
        check_positive(self, "start", allow_zero=("start",))


@dataclass
class ReportConfig:
    runs: list[str] = opt(factory=list, help="run folders of `rho1 train`", positional=True)
    out: str = opt("report.html", "HTML file to write", short="-o")
    target: str | None = opt(None, "eval metric compared (default: the first eval store's target_loss)")
    baseline: str | None = opt(None, "run (folder name) token efficiency is measured against (default: the first "
                               "CLM run)")

    def check(self) -> None:
        if not self.runs:
            raise ValueError("rho1 report needs at least one run folder of `rho1 train`")


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "output folder", short="-o")
    seed: int = opt(0, "seed of the data and the models")
    model_preset: str = opt("tiny", "model size", choices=tuple(MODEL_PRESETS))
    vocab_size: int = opt(2048, "BPE vocabulary trained on the web corpus")
    seq_len: int = opt(256, "window length")
    batch_size: int = opt(8, "windows per step")
    lr: float = opt(2e-3, "peak learning rate")
    ratio: float = opt(0.6, "fraction of tokens SLM keeps")
    base_tokens: int = opt(300_000, "base model pretraining on the web corpus (0: none; reference, CLM and SLM start "
                           "from it)")
    reference_tokens: int = opt(300_000, "reference training on the clean math")
    train_tokens: int = opt(500_000, "CLM / SLM / random budget")
    eval_points: int = opt(14, "held-out evaluations per run")
    n_reference: int = opt(3000, "clean problems")
    n_web: int = opt(3500, "web pages")
    n_heldout: int = opt(250, "held-out problems")
    n_offtarget: int = opt(150, "held-out off-topic pages")
    math_share: float = opt(0.35, "share of web pages with a worked problem")
    wrong_share: float = opt(0.5, "share of those whose worked answer has a mistake")
    accuracy_problems: int = opt(100, "held-out problems for 2-shot answer accuracy (0: skip)")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")

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
