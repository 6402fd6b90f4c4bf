"""The reference a `rho1 train` run scores its tokens against in the loop (when it has no ScoreStore): a model
given by --reference (online, held in the compute dtype as `rho1 score` holds it), or ``self``, the learner's own
weights (rho1.self_reference), which moves after each optimizer step with --reference-ema or --reference-update.
Under --use-peft the reference rides on the learner's base (rho1.lora): no frozen weight is held twice."""

from __future__ import annotations

from rho1.accel import compute_dtype
from rho1.align import load_reference
from rho1.config import TrainConfig
from rho1.data.store import TokenStore
from rho1.head import linear_head_of
from rho1.lora import (
    REFERENCE,
    AdapterView,
    adapter_base,
    advance_adapter_reference,
    is_adapter_folder,
    reference_adapter,
    same_base,
)
from rho1.self_reference import advance_reference, check_self_reference_supported, frozen_copy


def loop_reference(cfg: TrainConfig, store: TokenStore, accelerator, learner) -> tuple | None:
    """(model, head_of) of the reference run in the loop, or None when the run has none."""
    if not cfg.reference:
        return None
    if cfg.use_peft and (cfg.reference == "self" or is_adapter_folder(cfg.reference)):
        view = adapter_reference(cfg, learner)
        return view, linear_head_of(view, store, cfg.seq_len)
    if cfg.reference == "self":
        from accelerate import DistributedType

        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                   DistributedType.MEGATRON_LM)
        check_self_reference_supported(accelerator.distributed_type.value if sharded else None,
                                       "score with a reference (`rho1 score`) instead")
        model = frozen_copy(learner, float32=cfg.reference_ema is not None).to(accelerator.device)
        return model, linear_head_of(model, store, cfg.seq_len)
    model = load_reference(cfg.reference, store, cfg.cross_tokenizer, compute_dtype(cfg.precision),
                           cfg.trust_remote_code)
    model = model.to(accelerator.device).eval().requires_grad_(False)
    return model, None if cfg.cross_tokenizer else linear_head_of(model, store, cfg.seq_len)


def adapter_reference(cfg: TrainConfig, learner) -> AdapterView:
    """Under --use-peft, the reference on the learner's own base: its adapters off (self), a second adapter that
    moves (--reference-ema, --reference-update), or a PEFT adapter folder made on the same base."""
    if cfg.reference == "self" and cfg.reference_ema is None and not cfg.reference_update:
        return AdapterView(learner, None)
    if cfg.reference == "self":
        reference_adapter(learner, "copy")
    else:
        base = adapter_base(cfg.reference)
        if not same_base(base, cfg.model):
            raise ValueError(f"--reference {cfg.reference} is an adapter trained on {base or 'an unrecorded base'}, not "
                             f"on the learner's --model {cfg.model}; pass an adapter made on {cfg.model}, or a whole "
                             "reference model (e.g. its merged RUN/final)")
        reference_adapter(learner, "load", cfg.reference)
    return AdapterView(learner, REFERENCE)


def after_step(run) -> None:
    """A self reference's move after the run's optimizer step ``run.step``."""
    cfg = run.cfg
    if cfg.reference != "self":
        return
    learner = run.accelerator.unwrap_model(run.model)
    if cfg.use_peft:
        advance_adapter_reference(learner, run.step, cfg.reference_ema, cfg.reference_update)
    else:
        advance_reference(run.reference[0], learner, run.step, cfg.reference_ema, cfg.reference_update)
