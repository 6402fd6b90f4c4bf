"""The reference a `rho1 train` run scores its tokens against in the loop (when it has no ScoreStore): a model
given by --reference (online, held in the compute dtype as `rho1 score` holds it), or ``self``, the learner's own
weights (rho1.self_reference), which moves after each optimizer step with --reference-ema or --reference-update."""

from __future__ import annotations

from rho1.accel import compute_dtype
from rho1.align import load_reference
from rho1.config import TrainConfig
from rho1.data.store import TokenStore
from rho1.head import linear_head_of
from rho1.self_reference import advance_reference, check_self_reference_supported, frozen_copy


def loop_reference(cfg: TrainConfig, store: TokenStore, accelerator, learner) -> tuple | None:
    """(model, head_of) of the reference run in the loop, or None when the run has none."""
    if not cfg.reference:
        return None
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


def after_step(run) -> None:
    """A self reference's move after the run's optimizer step ``run.step``."""
    cfg = run.cfg
    if cfg.reference == "self":
        advance_reference(run.reference[0], run.accelerator.unwrap_model(run.model), run.step, cfg.reference_ema,
                          cfg.reference_update)
