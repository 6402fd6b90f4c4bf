"""Devices and processes, through accelerate: one place that builds the Accelerator."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def make_accelerator(precision: str = "no") -> Accelerator:
    """The Accelerator for this process. Launched by `accelerate launch` or `torchrun` on machines without
    CUDA, accelerate only forms the process group (gloo) when told to use the CPU, so tell it then."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=precision, cpu=several and not torch.cuda.is_available())


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype the LM head's loss is computed in under mixed precision (None: the weights' dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
