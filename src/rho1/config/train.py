"""`rho1 train`: the options of a training run (CLM, SLM, the reference, the GPU options), and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rho1.checks import check_choice, check_positive, check_ratio, check_self_reference, check_seq_len
from rho1.config.options import (
    ATTENTION,
    MODEL_PRESETS,
    PRECISIONS,
    TRACKERS,
    TRAIN_ON,
    TRAIN_ON_HELP,
    _rules,
    _scores,
    opt,
)
from rho1.selection.rules import check_rule_options
from rho1.selection.scores import SCORES


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
    lr: float | None = opt(None, "peak learning rate (default: 2e-3 for a fresh --model-preset model, 5e-5 to fine-tune "
                           "a pretrained --model, 2e-4 for its LoRA adapters)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup_steps: int | None = opt(None, "linear warmup steps (default: 20 for a fresh model, 3% of the steps for a "
                                   "pretrained --model)")
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
                                   "A100/H100/H200; on a CPU, its cores x clock x vector width)")
    use_peft: bool = opt(False, "train LoRA adapters (PEFT) on the frozen model; the reference rides on the same base: "
                         "--reference self is the base, --reference-ema/-update a second adapter")
    lora_r: int = opt(16, "--use-peft: the adapters' rank")
    lora_alpha: float = opt(32.0, "--use-peft: LoRA's alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.05, "--use-peft: dropout on the adapters' input")
    lora_target_modules: list[str] = opt(factory=lambda: ["all-linear"], help="--use-peft: the modules that get an "
                                         "adapter (e.g. q_proj v_proj; all-linear: every linear layer but the head)")
    load_in_4bit: bool = opt(False, "--use-peft: hold the frozen base in 4 bits (bitsandbytes, CUDA; QLoRA)")

    def check(self) -> None:
        if not self.data:
            raise ValueError("rho1 train needs --data TOKEN_STORE (made by `rho1 prepare`)")
        self._check_choices()
        check_ratio(self.ratio)
        self._check_self_reference()
        if self.score is None:  # resolved once, so RUN/config.yaml names the score used
            self.score = "retrospective" if self.reference == "self" else "excess"
        check_choice("score", self.score, tuple(SCORES))
        check_rule_options(self.rule, self.temperature, self.threshold)
        self._check_inputs()
        self._check_numbers()
        self._check_lora()
        self._take_defaults()

    def _check_choices(self) -> None:
        check_choice("attn_implementation", self.attn_implementation, (None, *ATTENTION))
        for name in self.report_to:
            check_choice("report_to", name, TRACKERS + ("all", "none"))
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError("--report-to none cannot be combined with a tracker; pass one or the other")
        check_choice("objective", self.objective, ("clm", "slm"))
        check_choice("train_on", self.train_on, TRAIN_ON)
        check_choice("selection_scope", self.selection_scope, ("micro", "global"))
        check_choice("model_preset", self.model_preset, tuple(MODEL_PRESETS))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("loss_impl", self.loss_impl, ("auto", "logits"))

    def _check_inputs(self) -> None:
        """Options that name where the data, the reference losses or the selection come from."""
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
        if self.selection and self.objective != "clm":
            raise ValueError("--selection trains on the labels an export kept, with the clm objective; drop "
                             "--objective slm (the export already is the selection)")
        if self.selection and (self.scores or self.reference):
            raise ValueError("--selection is a static selection made by `rho1 export`; drop --scores and --reference")

    def _check_numbers(self) -> None:
        if self.peak_flops is not None and not (self.peak_flops > 0 and math.isfinite(self.peak_flops)):
            raise ValueError(f"--peak-flops must be a positive number of FLOP/s (e.g. 989e12), got {self.peak_flops}")
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "grad_accum", "seq_len", "max_tokens", "log_every", "threads")
        check_positive(self, "eval_every", "eval_max_windows", "save_every", "keep_last", "warmup_steps",
                       "weight_decay", "grad_clip", allow_zero=("eval_every", "eval_max_windows", "save_every",
                                                                "keep_last", "warmup_steps", "weight_decay",
                                                                "grad_clip"))
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")

    def _check_lora(self) -> None:
        lora_given = (self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules) != (
            16, 32.0, 0.05, ["all-linear"])
        if self.load_in_4bit and self.use_peft and not self.model:
            raise ValueError("--load-in-4bit quantizes a pretrained --model's base, and a --model-preset is built fresh "
                             "in float32; pass --model, or drop --load-in-4bit")
        if not self.use_peft and (lora_given or self.load_in_4bit):
            raise ValueError("--lora-* and --load-in-4bit shape the adapters of --use-peft; pass --use-peft or drop "
                             "them")
        if not self.use_peft:
            return
        check_positive(self, "lora_r", "lora_alpha")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ValueError("--lora-target-modules names no module; pass all-linear or module names (q_proj v_proj)")
        if self.torch_compile:
            raise ValueError("--torch-compile compiles decoder layers, and --use-peft swaps their linear layers for "
                             "adapters; drop one of them")

    def _take_defaults(self) -> None:
        """--lr that fits the start when not given (``default_schedule``); --warmup-steps is counted over the real
        steps, which depend on the process count, so ``resolve_warmup`` takes it once that is known."""
        lr, _, _ = default_schedule(self)
        self.lr = lr if self.lr is None else self.lr

    def resolve_warmup(self, processes: int) -> None:
        """--warmup-steps, when not given, from the optimizer steps a run of ``processes`` processes takes."""
        if self.warmup_steps is None:
            self.warmup_steps = default_schedule(self, processes)[1]

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


def default_schedule(cfg: TrainConfig, processes: int = 1) -> tuple[float, int, str]:
    """(--lr, --warmup-steps, for what) that fit a run's start, as litgpt's finetune recipes choose them: a fresh
    model (2e-3, 20 steps), all the weights of a pretrained one (5e-5, 3% of the steps: measured on SmolLM2-135M,
    2e-3 left the held-out answer loss at 1.32 after 8k tokens where 5e-5 reached 1.23), or LoRA adapters on it
    (2e-4, 3% of the steps). The steps are those the run takes: each one holds batch x accumulation x ``processes``
    windows."""
    if not cfg.model:
        return 2e-3, 20, "a fresh model"
    steps = -(-cfg.max_tokens // (cfg.batch_size * cfg.grad_accum * processes * cfg.seq_len))
    warmup = max(1, round(0.03 * steps))
    if cfg.use_peft:
        return 2e-4, warmup, "LoRA adapters on a pretrained --model"
    return 5e-5, warmup, "fine-tuning all the weights of a pretrained --model"
