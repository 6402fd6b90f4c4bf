"""The SLM loss from the LM head's input instead of its output: per-token cross-entropy computed a chunk
of rows at a time, never holding the ``[tokens x vocab]`` logits, with a backward through the selected
tokens only."""

from __future__ import annotations

from dataclasses import replace

import torch

from rho1.selection.loss import Selection, check_inputs, flag_non_finite, select_from_token_loss, valid_mask


def default_chunk_size(device: torch.device | str) -> int:
    """Rows of logits computed at once for losses only: 512 on CPU (128 ran the head 11% slower at a 49k
    vocabulary, larger no faster), large on GPUs."""
    return 512 if torch.device(device).type == "cpu" else 4096


# Softmax rows the forward keeps for the backward of the selected rows, in bytes: recomputing their logits cost a
# third of the head's backward (an SLM step was no cheaper than a CLM step). Past it, rows are recomputed.
KEEP_BYTES = 1 << 30


def rows_to_keep(rows: int, vocab: int, budget: int | None = None) -> int:
    """The leading rows whose softmax fits ``budget`` bytes of float32 (``KEEP_BYTES``)."""
    return min(rows, (KEEP_BYTES if budget is None else budget) // (4 * vocab))


_SPARE: list[torch.Tensor] = []  # CPU buffers a backward has finished with, for the next step's kept rows


def _kept_buffer(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` float32 for the kept softmax. On CPU a buffer a finished backward gave back is reused: a
    fresh one costs a page fault per 4 kB written, 30% of the head's forward at a 32k vocabulary (CUDA's caching
    allocator reuses memory itself). A buffer still held by a graph whose backward has not run is never taken."""
    if device.type == "cpu" and rows:
        for i, spare in enumerate(_SPARE):
            if spare.numel() >= rows * vocab:
                return _SPARE.pop(i)[: rows * vocab].view(rows, vocab)
    return torch.empty(rows, vocab, device=device, dtype=torch.float32)


def _give_back(kept: torch.Tensor) -> None:
    """The kept softmax, once its backward has run, for the next forward (one spare, the largest, is kept)."""
    if kept.device.type == "cpu" and kept.numel():
        base = (kept._base if kept._base is not None else kept).view(-1)
        _SPARE[:] = sorted([*_SPARE, base], key=lambda t: -t.numel())[:1]


def grad_chunk_size(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk when gradients are computed: every chunk reads and writes the whole head-weight
    gradient, so chunks are as large as the hidden states allow (a chunk of logits about the size of the
    hidden states, as Liger-Kernel's fused linear cross-entropy does), and at least 128 rows."""
    return max(128, -(-rows // -(-vocab // hidden)))


def _logits(buffer: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, into: bool = False) -> torch.Tensor:
    """``h @ weight.T`` as float32. In float32 it is written into ``buffer``, reused chunk after chunk:
    on CPU a fresh tensor of this size costs more in page faults than the matmul saves. ``into``: always
    written into ``buffer`` (the rows the forward keeps)."""
    if h.dtype == weight.dtype == buffer.dtype:
        return torch.mm(h, weight.T, out=buffer[: h.shape[0]])
    if into:
        return buffer[: h.shape[0]].copy_(h @ weight.T)
    return (h @ weight.T).float()


def _probs_minus_onehot_(logits, lse, labels):
    """In place: softmax(logits) minus the one-hot label, d(cross-entropy)/d(logits)."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(labels.numel(), device=labels.device), labels] -= 1.0
    return probs


class _SelectedLinearCE(torch.autograd.Function):
    """Weighted sum of cross-entropy over the selected rows of ``hidden @ weight.T``: the backward takes the
    softmax of the rows the forward kept (``kept``, up to ``KEEP_BYTES``) and recomputes the logits of the other
    selected rows chunk by chunk; unselected rows cost nothing."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, labels, lse, row_weights, loss_sum, chunk_size, kept):
        ctx.save_for_backward(hidden, weight, rows, labels, lse, row_weights, kept)
        ctx.chunk_size = chunk_size or grad_chunk_size(rows.numel(), weight.shape[0], weight.shape[1])
        return loss_sum.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if getattr(ctx, "done", False):  # its kept softmax went back to the pool after the first backward
            raise RuntimeError("the selective loss cannot be backpropagated twice (retain_graph): compute it again")
        ctx.done = True
        hidden, weight, rows, labels, lse, row_weights, kept = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        # rows are ascending: the first ``split`` selected rows have their softmax from the forward (kept)
        split = int(torch.searchsorted(rows, len(kept))) if len(kept) else 0
        size = ctx.chunk_size
        buffer = torch.empty(min(size, rows.numel()), weight.shape[0], device=hidden.device)
        for start in [*range(0, split, size), *range(split, rows.numel(), size)]:
            end = min(start + size, split if start < split else rows.numel())
            idx = rows[start:end]
            h = hidden[idx]
            scale = (row_weights[start:end] * grad_out)[:, None]
            if start < split:  # a copy into the buffer: the saved softmax stays as it is
                grad_logits = torch.index_select(kept, 0, idx, out=buffer[: idx.numel()])
                grad_logits[torch.arange(idx.numel(), device=idx.device), labels[start:end]] -= 1.0
                grad_logits.mul_(scale)
            else:
                logits = _logits(buffer, h, weight)
                grad_logits = _probs_minus_onehot_(logits, lse[start:end], labels[start:end]).mul_(scale)
            if grad_hidden is not None:
                grad_hidden[idx] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.float())
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        _give_back(kept)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


class _PrecomputedLinearCE(torch.autograd.Function):
    """Sum of cross-entropy over every valid row, whose gradient was computed during the chunked forward
    (when every token is selected, nothing waits on the selection): the backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, loss_sum, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), (grad_weight * grad_out).to(ctx.weight_dtype), None, None, None


@torch.no_grad()
def chunked_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None, grad_rows=None, keep=None):
    """Per-token cross-entropy of ``hidden[n, d] @ weight[v, d].T`` against ``labels[n]``, computed
    ``chunk_size`` rows at a time (float32, 0 where ignored), never holding the ``[n x v]`` logits.

    Returns ``(losses, lse, grad_hidden, grad_weight)``: the log-sum-exp per row, and with ``grad_rows``
    (bool per row) the gradient of those rows' loss sum for hidden and weight, computed in the same pass
    (otherwise None). ``keep``: a float32 ``[k, v]`` tensor that receives the softmax of the first k rows (k a
    multiple of ``chunk_size``, or every row)."""
    chunk_size = chunk_size or default_chunk_size(hidden.device)
    with_grad = grad_rows is not None
    losses = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(losses)
    grad_hidden = torch.zeros_like(hidden) if with_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
    buffer = torch.empty(min(chunk_size, labels.numel()), weight.shape[0], device=hidden.device)
    for start in range(0, labels.numel(), chunk_size):
        h = hidden[start : start + chunk_size]
        target = labels[start : start + chunk_size]
        safe_target = target.clamp(min=0)
        kept = keep is not None and start + h.shape[0] <= len(keep)
        logits = _logits(keep[start : start + h.shape[0]], h, weight, into=True) if kept else _logits(buffer, h, weight)
        picked = logits.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        peak = logits.amax(dim=1)
        chunk_lse = logits.sub_(peak[:, None]).exp_().sum(dim=1).log_().add_(peak)  # logits now hold exp(l - peak)
        losses[start : start + chunk_size] = torch.where(target != ignore_index, chunk_lse - picked, 0.0)
        lse[start : start + chunk_size] = chunk_lse
        if kept:
            logits.mul_(torch.exp(peak - chunk_lse)[:, None])  # the softmax, for the backward
        if with_grad:
            probs = logits.mul_(torch.exp(peak - chunk_lse)[:, None])  # softmax
            probs[torch.arange(target.numel(), device=target.device), safe_target] -= 1.0
            grad_logits = probs.mul_(grad_rows[start : start + chunk_size, None])
            grad_hidden[start : start + chunk_size] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight.addmm_(grad_logits.T, h.float())
    return losses, lse, grad_hidden, grad_weight


def selective_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_loss: torch.Tensor | None,
    ratio: float = 0.6,
    score: str = "excess",
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    gather=None,
    rank: int = 0,
    rule: str = "topk",
    rule_options: dict | None = None,
) -> Selection:
    """``selective_loss`` computed from the LM head's input instead of its output.

    ``hidden[..., d]`` are the final hidden states (``logits = hidden @ weight.T``), ``labels`` and
    ``ref_loss`` shaped like ``hidden.shape[:-1]``. Per-token losses are computed ``chunk_size`` rows at a
    time without keeping the ``[tokens x vocab]`` logits, and the backward produces gradient only through
    the tokens with a weight (for hidden states and the head weight). Same selection and result as
    ``selective_loss(hidden @ weight.T, labels, ref_loss, ...)``; ``gather``/``rank`` as in
    ``select_from_token_loss``. At ``ratio=1`` (plain causal LM) the gradient is computed in the forward
    pass instead of recomputing the logits in the backward.
    """
    ratio = check_inputs(ratio, score, ref_loss, labels, rule)
    if weight.dtype != hidden.dtype:  # e.g. bf16 activations from autocast and a float32 head
        weight = weight.to(hidden.dtype)
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    # every valid token is kept at ratio 1, so the selected rows are known before the forward
    every_token = ratio >= 1.0 and rule == "topk" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    valid = valid_mask(flat_labels, None if ref_loss is None else ref_loss.reshape(-1), ignore_index)
    forward_chunk = chunk_size or (grad_chunk_size(len(valid), weight.shape[0], weight.shape[1]) if every_token
                                   else default_chunk_size(hidden.device))
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    n_keep = rows_to_keep(len(valid), weight.shape[0]) if needs_grad and not every_token else 0
    n_keep = n_keep // forward_chunk * forward_chunk if n_keep < len(valid) else n_keep  # whole chunks
    keep = _kept_buffer(n_keep, weight.shape[0], hidden.device)
    token_loss, lse, grad_hidden, grad_weight = chunked_cross_entropy(flat_hidden, weight, flat_labels, ignore_index,
                                                                      forward_chunk, valid if every_token else None,
                                                                      keep)
    token_loss = token_loss.view(shape)
    picked = select_from_token_loss(token_loss, labels, ref_loss, ratio, score, ignore_index, generator, gather, rank,
                                    rule, rule_options)
    if every_token:
        loss_sum = _PrecomputedLinearCE.apply(flat_hidden, weight, token_loss.reshape(-1)[valid].sum(),
                                              grad_hidden, grad_weight)
    else:
        row_weights = picked.weights.reshape(-1)
        rows = (row_weights > 0).nonzero(as_tuple=True)[0]
        row_weights = row_weights[rows]
        loss_sum = _SelectedLinearCE.apply(flat_hidden, weight, rows, flat_labels[rows], lse[rows], row_weights,
                                           (token_loss.reshape(-1)[rows] * row_weights).sum(), chunk_size, keep)
    loss_sum = flag_non_finite(loss_sum, token_loss, valid.view(shape))
    loss = loss_sum / picked.n_selected if picked.n_selected > 0 else loss_sum * 0.0
    return replace(picked, loss=loss, loss_sum=loss_sum, token_loss=token_loss)
