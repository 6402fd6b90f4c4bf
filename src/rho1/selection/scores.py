"""Score functions: which tokens a selection keeps first. A registry, so a new score is one
``register_score`` call, from rho1 or from your own code, and every stage (``rho1.train.train``,
``SelectiveTrainer``, ``rho1 sweep``, the config checks and the CLI's choices) knows it.

A score function is ``fn(learner_loss, reference_loss, generator) -> scores``: per-token tensors of the
same shape (``reference_loss`` is None when the function does not need it), higher = kept first.
``generator`` is a ``torch.Generator`` for functions that draw random numbers (its own stream for each
step and micro-batch; under the global scope every process scores the whole gathered batch with the same
stream). This module imports no torch, so the CLI can list the names at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreFunction:
    name: str
    fn: Callable
    needs_reference: bool
    help: str = ""


SCORES: dict[str, ScoreFunction] = {}


def register_score(name: str, fn: Callable, needs_reference: bool = True, help: str = "") -> ScoreFunction:
    """Make ``name`` a score function everywhere (``--score NAME``, ``score="NAME"``). Registering one of
    your own names again replaces it; the built-in names cannot be replaced."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a score function's name must be letters, digits, - or _, got {name!r}")
    if name in BUILT_IN and name in SCORES:
        raise ValueError(f"{name!r} is a built-in score function; register yours under another name")
    SCORES[name] = ScoreFunction(name, fn, needs_reference, help)
    return SCORES[name]


def get_score(name: str) -> ScoreFunction:
    if name not in SCORES:
        raise ValueError(f"unknown score function {name!r}; choose one of {', '.join(SCORES)} "
                         "(or register your own with rho1.register_score)")
    return SCORES[name]


def check_score(name: str) -> str:
    get_score(name)
    return name


def _random(learner, reference, generator=None):
    import torch

    return torch.rand(learner.shape, generator=generator, device="cpu").to(learner.device)


BUILT_IN = ("excess", "retrospective", "reference", "learner", "random")
register_score("excess", lambda learner, reference, generator=None: learner - reference, True,
               "learner loss minus reference loss (the paper's rule)")
register_score("retrospective", lambda learner, reference, generator=None: reference - learner, True,
               "reference loss minus learner loss: what the learner has learned since the reference, its own earlier "
               "weights (ssToken's retrospective excess loss; the default with --reference self)")
register_score("reference", lambda learner, reference, generator=None: -reference, True,
               "the tokens the reference model finds easiest")
register_score("learner", lambda learner, reference, generator=None: learner, False,
               "the tokens the model being trained finds hardest")
register_score("random", _random, False, "a random choice of the same size (control)")
