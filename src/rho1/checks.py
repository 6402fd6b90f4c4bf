"""The checks of options every stage shares (a ratio, a choice, a positive number...): a leaf module that
imports nothing of rho1, so the configs and the selection code both use it."""

from __future__ import annotations


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


def check_self_reference(is_self: bool, ema: float | None, every: int, cli: bool = True) -> None:
    """The options that move a self reference (a moving average, or a copy every N steps), as `rho1 train` spells
    them (``cli``) or as ``SelectiveTrainer`` takes them."""
    ema_name, every_name, self_name = (("--reference-ema", "--reference-update", "--reference self") if cli else
                                       ("reference_ema", "reference_update", "reference_model='self'"))
    if not is_self and (ema is not None or every):
        raise ValueError(f"{ema_name} and {every_name} apply to {self_name}; pass it or drop them")
    if ema is not None and not 0 < ema < 1:
        raise ValueError(f"{ema_name} must be a decay in (0, 1), e.g. 0.99, got {ema}")
    if ema is not None and every:
        raise ValueError(f"pass one of {ema_name} (a moving average) and {every_name} (a copy every N steps), not both")
    if every is not None and every < 0:
        raise ValueError(f"{every_name} must be 0 or more, got {every}")


def check_not_self(flag: str, value: str | None, verb: str) -> None:
    """``self`` names the learner during `rho1 train` (a self reference), not a model another stage can load."""
    from pathlib import Path

    if value == "self" and not Path(value).exists():
        raise ValueError(f"{flag} self is a reference of `rho1 train --reference self` only (the learner as it trains); "
                         f"{verb} needs a trained model: pass its folder, .gguf file or hub name")
