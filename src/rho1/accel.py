"""Devices and processes, through accelerate: one place that builds the Accelerator."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState, PartialState


def make_accelerator(precision: str = "no") -> Accelerator:
    """The Accelerator for this process. Launched by `accelerate launch` or `torchrun` on machines without
    CUDA, accelerate only forms the process group (gloo) when told to use the CPU, so tell it then."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if not several and state and state.get("_mixed_precision") not in (None, precision):
        # one process, a stage with another precision than the last one (a notebook, the tests): accelerate
        # keeps its state per process and would refuse the change
        AcceleratorState._reset_state()
    on_cpu = several and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu)
    plugin = accelerator.state.fsdp_plugin if hasattr(accelerator.state, "fsdp_plugin") else None
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate turns FSDP on for accelerator devices only, while torch's FSDP2 runs on CPU with gloo:
        # keep the plugin `accelerate launch` configured, so an FSDP config runs (and is tested) on CPUs too
        from accelerate.utils import FullyShardedDataParallelPlugin

        PartialState().distributed_type = DistributedType.FSDP  # every AcceleratorState() copies it from here
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin or FullyShardedDataParallelPlugin()
    return accelerator


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype the LM head's loss is computed in under mixed precision (None: the weights' dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
