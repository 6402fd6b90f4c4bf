"""The LM head, in one place: whether a model's logits are a plain linear head, and then the loss computed
from the head's input inside the head's own forward (chunks, never the ``[tokens x vocab]`` logits; one
process, DDP or FSDP2 alike); one batch forwarded and selected (``forward_selection``); per-token losses of
a model over a batch or a whole TokenStore."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from rho1.data.loader import IGNORE_INDEX, make_batch
from rho1.data.store import TokenStore
from rho1.progress import progress_bar
from rho1.selection import (
    Selection,
    chunked_cross_entropy,
    select_from_token_loss,
    selective_linear_cross_entropy,
    token_cross_entropy,
)


@contextlib.contextmanager
def head_computes(model, fn):
    """Inside, the model's LM head returns ``fn(hidden, weight)`` instead of ``hidden @ weight.T``: a loss
    computed from the head's input, without the ``[tokens x vocab]`` logits, comes out of the model as its
    ``logits``. ``fn`` runs inside the head's own forward, where FSDP2 has gathered the head weight like any
    layer's (outside it the weight is sharded by vocabulary rows) and hooks its backward on what the head
    returns, so the same code runs in one process, under DDP and under FSDP2."""
    head = model.get_output_embeddings()
    own = head.__dict__.get("forward")  # a hook someone set on this module (head_is_linear refuses those)
    head.forward = lambda hidden: fn(hidden, head.weight)
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


@torch.no_grad()
def head_is_linear(model, input_ids: torch.Tensor) -> bool:
    """True when the model's logits are exactly what its head returns and the head is a plain linear layer
    without bias (nn.Linear's own forward, no hook replacing it: not a scaled or quantized subclass), checked
    on real input: no soft-capping or scaling after the head."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or "forward" in head.__dict__ \
            or type(head).forward is not torch.nn.Linear.forward:
        return False
    seen = {}

    def look(module, args, out):  # runs first, while FSDP2 still holds the whole weight
        seen["head"], seen["linear"] = out, torch.nn.functional.linear(args[0], module.weight)

    hook = head.register_forward_hook(look, prepend=True)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        hook.remove()
        model.train(was_training)
    out = seen.get("head")
    return out is not None and out.shape == logits.shape and torch.equal(out.float(), logits.float()) and \
        torch.allclose(out.float(), seen["linear"].float(), rtol=1e-3, atol=1e-3)


def forward_selection(model, inputs: dict, labels, ref_loss, ratio: float, score: str = "excess", *, head_of=None,
                      dtype=None, autocast=contextlib.nullcontext, drop_last: bool = False, **select) -> Selection:
    """Forward one batch through ``model`` (as prepared: DDP, FSDP2 or plain) and select its tokens;
    ``loss_sum`` keeps the graph.

    ``head_of``: the unwrapped model when its head is plain linear (``linear_head_of``): the loss is then
    computed from the head's input in chunks (``head_computes``), else from full logits. ``dtype``: the head's
    compute dtype under mixed precision. ``drop_last``: the last position predicts nothing in ``labels``
    (labels shifted outside, as in Trainer batches). ``select``: generator, gather, rank, rule and
    rule_options of ``select_from_token_loss``."""
    cut = slice(None, -1) if drop_last else slice(None)
    if head_of is None:
        with autocast():
            logits = model(**inputs).logits
        return select_from_token_loss(token_cross_entropy(logits[:, cut], labels), labels, ref_loss, ratio, score,
                                      **select)
    picked = []

    def loss(hidden, weight):
        hidden = hidden[:, cut]
        picked.append(selective_linear_cross_entropy(hidden if dtype is None else hidden.to(dtype), weight, labels,
                                                     ref_loss, ratio, score, **select))
        return picked[0].loss_sum

    with head_computes(head_of, loss), autocast():
        loss_sum = model(**inputs).logits
    if loss_sum.dtype != picked[0].loss_sum.dtype or not torch.equal(loss_sum.detach(), picked[0].loss_sum.detach()):
        raise ValueError("the model changes what its LM head returns (soft-capping, scaling or a cast after the head), "
                         "so the loss cannot be computed from the head's input; pass --loss-impl logits "
                         "(SelectiveTrainer(loss_impl='logits'))")
    return picked[0].through(loss_sum)


def linear_head_of(model, store: TokenStore, seq_len: int):
    """``model`` when its logits are a plain linear head (checked on the store's first tokens), else None:
    what ``head_of`` takes below."""
    device = next(model.parameters()).device
    sample = make_batch(store, np.arange(1), seq_len).input_ids[:, :32].to(device)
    return model if head_is_linear(model, sample) else None


def batch_token_losses(model, input_ids, labels, autocast=contextlib.nullcontext, head_of=None, dtype=None,
                       extra: dict | None = None):
    """Per-token losses of one batch (float32, shaped like ``labels``), no gradient. ``extra``: more inputs of
    the forward (``position_ids`` of packed rows).

    ``head_of``: the (unwrapped) model, when its logits are a plain linear head (``head_is_linear``):
    the losses are then computed from the head's input in chunks, without the ``[tokens x vocab]`` logits
    (faster and smaller). ``dtype``: the head's compute dtype in that case (bf16/fp16 under mixed precision).
    """
    if getattr(model, "cross_tokenizer", False):  # rho1.align.CrossTokenizerReference projects its own losses
        with torch.no_grad(), autocast():
            return model.losses(input_ids).to(input_ids.device)
    with torch.no_grad():
        if head_of is None:
            with autocast():
                logits = model(input_ids=input_ids, use_cache=False, **(extra or {})).logits
            return token_cross_entropy(logits, labels)

        def losses(hidden, weight):
            hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype or weight.dtype)
            return chunked_cross_entropy(hidden, weight.to(hidden.dtype), labels.reshape(-1))[0].view_as(labels)

        with head_computes(head_of, losses), autocast():
            return model(input_ids=input_ids, use_cache=False, **(extra or {})).logits.float()


@torch.inference_mode()
def token_losses(model, store: TokenStore, seq_len: int, batch_size: int = 16, windows=None,
                 autocast=contextlib.nullcontext, progress: bool = False, desc: str = "loss", head_of=None,
                 dtype=None, span: tuple[int, int] | None = None) -> np.ndarray:
    """Per-token loss of ``model`` over the store's windows: ``out[i]`` = loss of token i given its window.

    NaN where a token has no prediction (the first token of each window) or its window was not evaluated.
    ``head_of`` and ``dtype`` as in ``batch_token_losses``. ``span=(lo, hi)``: only tokens lo..hi-1, as
    ``out[i - lo]`` (memory for the span, not the store: `rho1 score` works through stores of any size).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = np.arange(store.num_windows(seq_len)) if windows is None else np.asarray(windows)
    lo, hi = span or (0, store.n_tokens)
    out = np.full(hi - lo, np.nan, dtype=np.float32)
    bar = progress_bar(total=len(windows) * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    for i in range(0, len(windows), batch_size):
        batch = make_batch(store, windows[i : i + batch_size], seq_len).to(device)
        losses = batch_token_losses(model, batch.input_ids, batch.labels, autocast, head_of, dtype)
        keep = (batch.positions >= lo) & (batch.positions < hi)
        out[batch.positions[keep].cpu().numpy() - lo] = losses[keep].float().cpu().numpy()
        bar.update(int(batch.input_ids.numel()))
    bar.close()
    model.train(was_training)
    return out


def reference_token_losses(model, input_ids, labels, head_of=None, autocast=contextlib.nullcontext, dtype=None,
                           extra: dict | None = None, rounded: bool = True):
    """A reference model's loss of each label, as a ScoreStore holds it: NaN where there is no label,
    rounded to float16 like stored scores, so a reference run in the loop selects exactly what stored
    scores select."""
    losses = batch_token_losses(model, input_ids, labels, autocast, head_of, dtype, extra)
    # (``rounded=False``: the learner's own history, never stored, is compared with the learner at full precision)
    return torch.where(labels != IGNORE_INDEX, losses.half().float() if rounded else losses, torch.nan)


def chunked_head_supported(accelerator) -> bool:
    """The loss from the head's input (``head_computes``) runs in one process, under DDP and under FSDP2;
    FSDP1 and DeepSpeed keep the full-logits path (untested there)."""
    from accelerate import DistributedType

    return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_GPU) or accelerator.is_fsdp2
