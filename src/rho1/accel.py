"""Devices and processes, through accelerate: one place that builds the Accelerator."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


def make_accelerator(precision: str = "no") -> Accelerator:
    """The Accelerator for this process. Launched by `accelerate launch` or `torchrun` on machines without
    CUDA, accelerate only forms the process group (gloo) when told to use the CPU, so tell it then."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if not several and state and state.get("_mixed_precision") not in (None, precision):
        # one process, a stage with another precision than the last one (a notebook, the tests): accelerate
        # keeps its state per process and would refuse the change
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=several and not torch.cuda.is_available())


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype the LM head's loss is computed in under mixed precision (None: the weights' dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
