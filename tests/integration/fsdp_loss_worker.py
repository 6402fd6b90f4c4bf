"""Run under `accelerate launch --config_file configs/accelerate/fsdp2.yaml`: each rank takes its rows of one
fixed global batch and computes the SLM loss of an FSDP2-sharded model twice, from the head's input in chunks
(``rho1.head.forward_selection``) and from full logits, with gradients. Rank 0 saves both (losses, selections,
whole gradients) and the head weight's shape outside the forward to argv[1]; argv[2]: the precision (no)."""

import contextlib
import sys

import torch

from rho1.accel import compute_dtype, make_accelerator
from rho1.head import forward_selection
from rho1.model import build_model
from rho1.selection import valid_mask

VOCAB = 96
CASES = {"slm": (0.4, "topk"), "clm": (1.0, "topk"), "soft": (0.5, "soft")}


def global_batch(rows: int = 4, t: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, t), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[torch.rand(rows, t, generator=g) < 0.1] = -100
    ref = torch.rand(rows, t, generator=g) * 5
    ref[torch.rand(rows, t, generator=g) < 0.1] = float("nan")
    return ids, labels, ref


def fresh_model():
    return build_model("nano", VOCAB, 64, eos_token_id=0, seed=0)


def one_step(model, ids, labels, ref, ratio, rule, path, gather=None, rank=0, scale=1.0, accelerator=None):
    """The selection of one batch, after its backward; ``scale`` multiplies the loss sum (processes / valid tokens
    of the whole batch, as rho1's loop does); ``accelerator`` brings its mixed precision."""
    model.zero_grad(set_to_none=True)
    precision = accelerator.mixed_precision if accelerator is not None else "no"
    selection = forward_selection(model, {"input_ids": ids}, labels, ref, ratio, head_of=model if path == "chunked"
                                  else None, dtype=compute_dtype(precision), gather=gather, rank=rank, rule=rule,
                                  autocast=accelerator.autocast if accelerator is not None else contextlib.nullcontext)
    (selection.loss_sum * scale).backward()
    return selection


if __name__ == "__main__":
    accelerator = make_accelerator(sys.argv[2] if len(sys.argv) > 2 else "no")
    model = fresh_model()
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))  # FSDP2 wants both
    n, rank = accelerator.num_processes, accelerator.process_index
    ids, labels, ref = global_batch()
    n_valid = float(valid_mask(labels, ref).sum())
    per = ids.shape[0] // n
    mine = slice(rank * per, (rank + 1) * per)
    head = accelerator.unwrap_model(model).get_output_embeddings().weight
    out = {"head_local_rows": head.to_local().shape[0] if hasattr(head, "to_local") else head.shape[0],
           "head_rows": head.shape[0], "processes": n}
    for case, (ratio, rule) in CASES.items():
        for path in ("chunked", "logits"):
            sel = one_step(model, ids[mine], labels[mine], ref[mine], ratio, rule, path, accelerator.gather, rank,
                           n / n_valid, accelerator)
            grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for name, p in model.named_parameters()}
            out[f"{case}/{path}"] = {"loss": accelerator.reduce(sel.loss_sum.detach(), "sum") / n_valid,
                                     "dtype": str(sel.loss_sum.dtype),
                                     "weights": accelerator.gather(sel.weights.contiguous()), "grads": grads}
    if accelerator.is_main_process:
        torch.save(out, sys.argv[1])
    accelerator.end_training()
