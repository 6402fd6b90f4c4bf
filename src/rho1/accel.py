"""Devices and processes, through accelerate: one place that builds the Accelerator."""

from __future__ import annotations

import dataclasses
import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState, PartialState


def make_accelerator(precision: str = "no", log_with: list[str] | None = None, logging_dir=None) -> Accelerator:
    """The Accelerator for this process. Launched by `accelerate launch` or `torchrun` on machines without
    CUDA, accelerate only forms the process group (gloo) when told to use the CPU, so tell it then.
    ``log_with``: accelerate's experiment trackers, writing under ``logging_dir`` where they write files."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if not several and state and state.get("_mixed_precision") not in (None, precision):
        # one process, a stage with another precision than the last one (a notebook, the tests): accelerate
        # keeps its state per process and would refuse the change
        AcceleratorState._reset_state()
    on_cpu = several and not torch.cuda.is_available()
    trackers = {}
    if log_with:
        from accelerate.utils import ProjectConfiguration

        trackers = {"log_with": log_with, "project_config": ProjectConfiguration(project_dir=str(logging_dir),
                                                                                  logging_dir=str(logging_dir))}
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu, **trackers)
    if on_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate turns FSDP on for accelerator devices only, while torch's FSDP2 runs on CPU with gloo: a
        # plugin read from the same settings `accelerate launch` exported, so an FSDP config runs (and is
        # tested) on CPUs as on GPUs
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if precision != "no":
            plugin.set_mixed_precision(precision)
        PartialState().distributed_type = DistributedType.FSDP  # every AcceleratorState() copies it from here
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    policy = getattr(accelerator.state, "fsdp_plugin", None) and accelerator.state.fsdp_plugin.mixed_precision_policy
    if policy is not None and hasattr(policy, "output_dtype"):
        # FSDP2 would cast the model's output, which is the float32 loss when the loss is computed inside the
        # head (rho1.head.head_computes), to bf16; and gradients are reduced in float32
        accelerator.state.fsdp_plugin.mixed_precision_policy = dataclasses.replace(
            policy, output_dtype=None, reduce_dtype=torch.float32)
    return accelerator


def compute_dtype(precision: str) -> torch.dtype | None:
    """The dtype the LM head's loss is computed in under mixed precision (None: the weights' dtype)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def everyone_agrees(accelerator: Accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process (a refusal on one must stop them all, or the others wait)."""
    bad = torch.tensor(0.0 if ok else 1.0, device=accelerator.device)
    return float(accelerator.reduce(bad, "sum")) == 0.0


def hold_job_lock(stack, accelerator: Accelerator, out, what: str) -> None:
    """The main process takes the write lock of ``out`` (``rho1.lock.write_lock``) into ``stack``; when it
    cannot, every process stops with its sentence."""
    from rho1.lock import write_lock

    error = None
    try:
        stack.enter_context(write_lock(out, what, enabled=accelerator.is_main_process))
    except ValueError as err:
        error = err
    if not everyone_agrees(accelerator, error is None):
        raise error or ValueError(f"{out} is being written by another process; wait for it to finish (or stop it), "
                                  "or choose another --out")
