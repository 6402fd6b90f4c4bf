"""What every stage's options are made of: ``opt`` (a dataclass field with its command-line help), the choices
stages share, and the model presets. Imports nothing heavy, so `rho1 --help` and a refused option answer at once."""

from __future__ import annotations

from dataclasses import MISSING, field

from rho1.selection.rules import RULES
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
