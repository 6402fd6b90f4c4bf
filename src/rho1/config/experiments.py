"""`rho1 sweep` and `rho1 demo`: studies made of the stages."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_choice, check_positive, check_ratio, check_seq_len
from rho1.config.options import (
    MODEL_PRESETS,
    _rules,
    _scores,
    opt,
)
from rho1.config.train import TrainConfig
from rho1.selection.rules import check_rule_options
from rho1.selection.scores import SCORES


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
