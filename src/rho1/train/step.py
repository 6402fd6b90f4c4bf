"""One optimizer step of `rho1 train`: take the next windows of the seeded order, forward each micro-batch and
select its tokens, backpropagate the kept tokens' loss sum, then scale the gradients by the number of tokens
selected over the whole step and every process (known only after the forward, so any selection rule works),
clip, update."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from rho1.accel import compute_dtype, everyone_agrees
from rho1.config import TrainConfig
from rho1.data.loader import make_batch
from rho1.head import forward_selection, reference_token_losses
from rho1.selection import Selection, select_from_token_loss, valid_mask
from rho1.train.run import Run


def selection_seed(cfg: TrainConfig, step: int, micro: int, rank: int, global_scope: bool = False) -> int:
    """The seed of a random score's stream: one for each step and micro-batch, and for each process when
    it ranks its own micro-batch (rank 0 keeps the single-process stream). Under the global scope every
    process scores the whole gathered batch, so they share the stream and agree on the selection."""
    return cfg.seed * 1_000_003 + step * cfg.grad_accum + micro + (0 if global_scope else rank * 7_919_000_001)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def all_finite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """True when the value is finite on every process (they must agree, or DDP would wait forever)."""
    return everyone_agrees(accelerator, bool(torch.isfinite(value).all()))


def step_batches(run: Run, step: int) -> list:
    """This process's micro-batches of a step, with reference losses when a reference runs in the loop."""
    cfg, acc = run.cfg, run.accelerator
    windows = run.order.take(step * run.windows_per_step, run.windows_per_step)
    n_proc, rank = acc.num_processes, acc.process_index
    micro = [make_batch(run.store, windows[(m * n_proc + rank) * cfg.batch_size:][: cfg.batch_size], cfg.seq_len,
                        run.scores, run.keep).to(acc.device) for m in range(cfg.grad_accum)]
    if run.reference is not None:
        ref_model, ref_head = run.reference
        for batch in micro:
            batch.ref_loss = reference_token_losses(ref_model, batch.input_ids, batch.labels, ref_head, acc.autocast,
                                                    compute_dtype(cfg.precision), rounded=cfg.reference != "self")
    return micro


def selected_loss(run: Run, batch, ref_loss, ratio: float, score: str, generator=None, rule: str = "topk") -> Selection:
    """Forward one micro-batch and select its tokens; ``loss_sum`` keeps the graph. The global scope ranks
    the same micro-batch of every process at once (the losses are gathered)."""
    acc = run.accelerator
    gather = acc.gather if (ratio < 1.0 or rule != "topk") and run.cfg.selection_scope == "global" and \
        acc.num_processes > 1 else None
    return forward_selection(run.model, {"input_ids": batch.input_ids}, batch.labels, ref_loss, ratio, score,
                             head_of=acc.unwrap_model(run.model) if run.chunked_head else None,
                             dtype=compute_dtype(run.cfg.precision), autocast=acc.autocast, generator=generator,
                             gather=gather, rank=acc.process_index, rule=rule, rule_options=run.cfg.rule_options)


def micro_step(run: Run, batch, step: int, micro: int) -> tuple[Selection, dict]:
    """The selection of one micro-batch and the statistics to log (CLM with scores logs what SLM would
    have kept)."""
    cfg = run.cfg
    if run.selecting:
        acc = run.accelerator
        global_scope = cfg.selection_scope == "global" and acc.num_processes > 1
        generator = torch.Generator().manual_seed(selection_seed(cfg, step, micro, acc.process_index, global_scope))
        selection = selected_loss(run, batch, batch.ref_loss, run.ratio, cfg.score, generator, cfg.rule)
        return selection, selection.stats
    selection = selected_loss(run, batch, None, 1.0, "learner")
    if batch.ref_loss is None:
        return selection, selection.stats
    shadow = select_from_token_loss(selection.token_loss, batch.labels, batch.ref_loss, cfg.ratio, rule=cfg.rule,
                                    rule_options=cfg.rule_options)
    return selection, {**shadow.stats, "frac_selected": 1.0}


def label_sums(batch, selection: Selection, valid: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Per source label (rows): [valid tokens, selected tokens (sum of weights), excess-loss sum, tokens with a
    reference]."""
    ids = batch.label_ids.to(valid.device)
    with_ref = valid & torch.isfinite(batch.ref_loss) if batch.ref_loss is not None else torch.zeros_like(valid)
    excess = selection.token_loss.float() - torch.nan_to_num(batch.ref_loss.float()) if batch.ref_loss is not None \
        else torch.zeros_like(selection.token_loss, dtype=torch.float32)

    def count(mask, weights=None):
        return torch.bincount(ids[mask], None if weights is None else weights[mask], minlength=n_labels).float()

    weights = selection.weights.float() if selection.weights is not None else selection.mask.float()
    return torch.stack([count(valid), count(valid, weights), count(with_ref, excess), count(with_ref)], 1)


@dataclass
class StepResult:
    lr: float
    loss_sum: torch.Tensor  # this process's sum of selected-token losses (detached)
    selected: float = 0.0  # tokens selected in the step (sum of weights), all processes
    grad_norm: float | None = None
    stats: list[dict] = field(default_factory=list)  # per micro-batch
    labels: torch.Tensor | None = None  # label_sums over the step (this process), when the store has labels
    skipped: str | None = None  # why the weights were not updated
    valid: float = 0.0  # tokens that could be selected in the step, all processes
    score_range: tuple[float, float] | None = None  # lowest and highest score of those (this process)


def scale_gradients(model, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step. Each micro-batch's loss sum is backpropagated divided by the valid tokens of the
    whole step (known before the forward, it keeps the gradients' scale); once every process has
    selected, the gradients are scaled to the number of selected tokens (all-reduced), then clipped."""
    cfg, acc = run.cfg, run.accelerator
    lr = lr_at(step, run.total_steps, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro = step_batches(run, step)
    n_valid = sum(float(valid_mask(b.labels, b.ref_loss if run.selecting else None).sum()) for b in micro)
    n_valid = acc.reduce(torch.tensor(n_valid, device=acc.device), "sum")
    result = StepResult(lr, torch.zeros((), device=acc.device), valid=float(n_valid))
    n_valid = n_valid.clamp(min=1.0)  # a tensor, as always
    n_selected = torch.zeros((), device=acc.device)
    for m, batch in enumerate(micro):
        selection, stats = micro_step(run, batch, step, m)
        if not all_finite(acc, selection.loss_sum):
            result.skipped = f"training loss became {float(selection.loss_sum.detach())}"
            return result
        with acc.no_sync(run.model) if m < len(micro) - 1 else contextlib.nullcontext():
            acc.backward(selection.loss_sum * acc.num_processes / n_valid)  # DDP averages over processes
        result.loss_sum += selection.loss_sum.detach()
        n_selected += selection.weights.sum() if selection.weights is not None else selection.mask.sum()
        result.stats.append(stats)
        if selection.score_range is not None:
            low, high = selection.score_range
            result.score_range = (low, high) if result.score_range is None else (
                min(low, result.score_range[0]), max(high, result.score_range[1]))
        if batch.label_ids is not None:
            valid = valid_mask(batch.labels, batch.ref_loss if run.selecting else None)
            sums = label_sums(batch, selection, valid, len(run.store.label_names))
            result.labels = sums if result.labels is None else result.labels + sums
    result.selected = float(acc.reduce(n_selected, "sum"))
    if result.selected == 0:  # e.g. a threshold no token passed: no update (AdamW would still move the weights)
        return result
    if result.selected != float(n_valid):  # fewer tokens than the valid ones were kept (or weights below 1)
        scale_gradients(run.model, float(n_valid) / result.selected)
    if cfg.grad_clip:
        grad_norm = acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        if not all_finite(acc, grad_norm):
            result.skipped = f"gradient norm became {float(grad_norm)}"
            return result
        result.grad_norm = float(grad_norm)
    run.optimizer.step()
    return result
