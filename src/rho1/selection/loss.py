"""The selective language modeling (SLM) loss from per-token losses.

The paper's loss (Rho-1, eq. 2): rank the tokens of a batch by excess loss
``L_theta(x_i) - L_ref(x_i)`` (or another registered score), keep the top ``ratio`` of them, and take
the mean cross-entropy over the kept tokens. Every other token is still fed forward, it just
contributes no loss. Other selection rules (``rho1.selection.rules``) give each token a weight in [0, 1]
instead; the loss is then the weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from rho1.checks import check_ratio
from rho1.selection.ranking import num_selected, select_top, valid_mask  # noqa: F401 (rho1.selection.loss names them too)
from rho1.selection.rules import get_rule
from rho1.selection.scores import get_score


@dataclass
class Selection:
    """What ``selective_loss`` returns.

    ``loss``: weighted mean cross-entropy over the selected tokens (differentiable).
    ``loss_sum``: the weighted sum before dividing, for normalising over several micro-batches.
    ``mask``: bool, the selected tokens (weight at least 0.5). ``weights``: float32 per token (0/1 for
    hard rules). ``n_selected``: the sum of weights (the number selected for hard rules).
    ``token_loss``: per-token cross-entropy (detached). ``stats``: plain floats for logging.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    mask: torch.Tensor
    n_selected: float
    n_valid: int
    token_loss: torch.Tensor
    stats: dict = field(default_factory=dict)
    weights: torch.Tensor | None = None
    score_range: tuple[float, float] | None = None  # lowest and highest finite score of the candidates (ranked)

    def through(self, loss_sum: torch.Tensor) -> Selection:
        """This selection with ``loss_sum`` as it came out of a model's forward (``rho1.head.head_computes``),
        where DDP and FSDP hook their backward."""
        return replace(self, loss_sum=loss_sum, loss=loss_sum / self.n_selected if self.n_selected > 0 else
                       loss_sum * 0.0)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy in float32, shaped like ``labels`` (0 where ignored)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view_as(labels)


def selection_stats(token_loss, ref_loss, mask, valid, weights=None) -> dict:
    """Fraction selected and mean learner / reference / excess loss on selected and unselected tokens (and,
    with soft ``weights``, the mean weight of each)."""
    token_loss = token_loss.detach().float()
    unselected = valid & ~mask
    n_valid = int(valid.sum())
    stats = {"frac_selected": float(mask.sum()) / n_valid if n_valid else 0.0}
    for name, part in (("selected", mask), ("unselected", unselected)):
        n = int(part.sum())
        if weights is not None:
            stats[f"weight_{name}"] = float(weights[part].mean()) if n else float("nan")
        stats[f"learner_loss_{name}"] = float(token_loss[part].mean()) if n else float("nan")
        if ref_loss is not None:
            ref = ref_loss.detach().float()[part]
            stats[f"ref_loss_{name}"] = float(ref.mean()) if n else float("nan")
            stats[f"excess_loss_{name}"] = float((token_loss[part] - ref).mean()) if n else float("nan")
    return stats


def flag_non_finite(loss_sum: torch.Tensor, token_loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``loss_sum`` made NaN when a valid token's loss is not finite, whether or not the rule kept that token:
    a diverged model then stops the run (or skips the step), whatever the rule and score."""
    if not torch.isfinite(token_loss.detach()[valid]).all():
        return loss_sum + float("nan")
    return loss_sum


def check_inputs(ratio: float, score: str, ref_loss: torch.Tensor | None, labels: torch.Tensor,
                 rule: str = "topk") -> float:
    """The checks every selective loss makes before any work; returns the ratio as a float."""
    ratio = check_ratio(ratio)
    get_rule(rule)
    if ref_loss is None and get_score(score).needs_reference:
        raise ValueError(f"score {score!r} needs reference losses; pass ref_loss or use score='learner'/'random'")
    if ref_loss is not None and ref_loss.shape != labels.shape:
        raise ValueError(f"ref_loss has shape {tuple(ref_loss.shape)} but labels have {tuple(labels.shape)}")
    return ratio


def selective_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_loss: torch.Tensor | None,
    ratio: float = 0.6,
    score: str = "excess",
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    rule: str = "topk",
    rule_options: dict | None = None,
) -> Selection:
    """The SLM loss of one batch.

    ``logits[b, t]`` predicts ``labels[b, t]`` (already shifted) and ``ref_loss[b, t]`` is the reference
    model's loss on that same label. Positions whose label is ``ignore_index`` or whose reference is NaN
    are never selected and never counted. With the ``topk`` rule exactly ``round(ratio * n_valid)`` tokens
    are kept (at least one); ``ratio=1.0`` keeps every valid token, which is the ordinary causal LM loss.
    Another ``rule`` weighs the tokens (``rule_options``: its temperature or threshold).
    """
    ratio = check_inputs(ratio, score, ref_loss, labels, rule)
    token_loss = token_cross_entropy(logits, labels, ignore_index)
    return select_from_token_loss(token_loss, labels, ref_loss, ratio, score, ignore_index, generator,
                                  rule=rule, rule_options=rule_options)


def select_from_token_loss(
    token_loss: torch.Tensor,
    labels: torch.Tensor,
    ref_loss: torch.Tensor | None,
    ratio: float = 0.6,
    score: str = "excess",
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    gather=None,
    rank: int = 0,
    rule: str = "topk",
    rule_options: dict | None = None,
) -> Selection:
    """``selective_loss`` for per-token losses computed elsewhere (``token_loss`` keeps its graph).

    Global scope: with ``gather`` (a function concatenating a tensor from every process along dim 0, in
    rank order, e.g. ``accelerator.gather``) the rule sees all processes' tokens at once, exactly as one
    process would on the concatenated batch; this process keeps its own rows, and ``loss`` is its
    weighted sum divided by the global sum of weights (the per-process losses add up to the global mean).
    """
    valid = valid_mask(labels, ref_loss, ignore_index)
    all_valid = valid if gather is None else gather(valid.to(torch.uint8)).bool()
    n_valid, score_range = int(all_valid.sum()), None
    chosen = get_rule(rule)
    if rule == "topk" and num_selected(n_valid, ratio) == n_valid:  # every valid token: nothing to rank
        weights, total = valid.float(), float(n_valid)
    else:
        learner = token_loss.detach().float()
        reference = ref_loss.float() if ref_loss is not None else None
        if gather is not None:  # every process scores the whole gathered batch, as one process would
            learner = gather(learner.contiguous())
            reference = None if reference is None else gather(reference.contiguous())
        scores = score_tokens(score, learner, reference, generator)
        all_valid = all_valid & torch.isfinite(scores)  # a NaN score is never selected, whoever computed it
        if all_valid.any():
            candidates = scores[all_valid]
            score_range = (float(candidates.min()), float(candidates.max()))
        weights = chosen.fn(scores, all_valid, ratio, **(rule_options or {})).float()
        # a rule of one's own is held to the contract: finite, in [0, 1], 0 where a token cannot be selected
        weights = torch.where(all_valid, torch.nan_to_num(weights, nan=0.0).clamp(0.0, 1.0), 0.0)
        total = float(weights.sum())
        if gather is not None:
            rows = labels.shape[0]
            weights = weights[rank * rows : (rank + 1) * rows]
    mask = weights >= 0.5
    loss_sum = torch.where(weights > 0, token_loss * weights, torch.zeros_like(token_loss)).sum()
    loss_sum = flag_non_finite(loss_sum, token_loss, valid)
    loss = loss_sum / max(total, 1e-12) if total > 0 else loss_sum * 0.0
    stats = selection_stats(token_loss, ref_loss, mask, valid, None if chosen.hard else weights)
    return Selection(loss, loss_sum, mask, total, n_valid, token_loss.detach(), stats, weights, score_range)


def score_tokens(score: str, learner: torch.Tensor, reference: torch.Tensor | None, generator=None) -> torch.Tensor:
    """A registered score function's scores (float32), held to its contract: one score per token."""
    scores = get_score(score).fn(learner, reference, generator)
    if not isinstance(scores, torch.Tensor) or scores.shape != learner.shape:
        got = f"a tensor of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else \
            f"a {type(scores).__name__}"
        raise ValueError(f"score function {score!r} returned {got}; it must return a tensor of one score per token, "
                         f"shaped like the learner's losses: {tuple(learner.shape)}")
    return scores.float()
