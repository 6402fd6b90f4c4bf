"""`rho1 eval`: held-out losses and answer accuracy."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_choice, check_not_self, check_positive, check_ratio, check_seq_len
from rho1.config.options import (
    TRAIN_ON,
    opt,
)


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
