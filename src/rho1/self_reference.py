"""A self reference: the learner's own weights as the reference of its selection (ssToken's retrospective
excess loss), as `rho1 train --reference self` and ``SelectiveTrainer(reference_model="self")`` both hold it.

It starts as a frozen copy of the learner's starting weights; ``--reference-ema DECAY`` makes it a moving
average of the learner's weights, ``--reference-update N`` a copy of the learner every N optimizer steps
(a self-evolving reference). A moving average is kept in float32: in bf16 a step of 1 - DECAY would mostly
round away.
"""

from __future__ import annotations

import copy

import torch

REFERENCE_FILE = "reference.safetensors"  # a self reference's weights in a checkpoint (rho1 train, SelectiveTrainer)


def check_self_reference_supported(distributed: str | None, fix: str) -> None:
    """A whole copy of the learner on each process: one process or DDP, not a sharded model."""
    if distributed is not None:
        raise ValueError(f"a self reference keeps a whole copy of the learner on each process, which runs on one "
                         f"process or under DDP, not under {distributed}: {fix}")


def frozen_copy(learner: torch.nn.Module, float32: bool = False) -> torch.nn.Module:
    """The learner's weights as a frozen model of their own. A forward patched onto the learner's modules (TRL
    does it, under PEFT too) would still call the learner's own: the copy drops it."""
    reference = copy.deepcopy(learner)
    for module in reference.modules():
        module.__dict__.pop("forward", None)
    if float32:
        reference.float()
    return reference.eval().requires_grad_(False)


@torch.no_grad()
def advance_reference(reference, learner, step: int, ema: float | None, every: int) -> None:
    """A self reference after optimizer step ``step`` (counted from 1): with ``ema`` a step of its moving
    average towards the learner (ref = ema * ref + (1 - ema) * learner), else every ``every`` steps a copy of it."""
    if ema is not None:
        for ref, p in zip(reference.parameters(), learner.parameters()):
            ref.lerp_(p.detach().to(ref.dtype), 1.0 - ema)
    elif every and step % every == 0:
        for ref, p in zip(reference.parameters(), learner.parameters()):
            ref.copy_(p.detach())
