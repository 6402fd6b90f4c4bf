"""Run under torchrun: each rank selects on its rows of one fixed global batch with global scope, and rank
0 writes the gathered mask to the path given as argv[1]."""

import sys

import torch
import torch.nn.functional as F

from rho1.accel import make_accelerator
from rho1.selection import select_from_token_loss


def global_batch(seed: int = 0, rows: int = 6, t: int = 13, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, t, v, generator=g)
    labels = torch.randint(0, v, (rows, t), generator=g)
    labels[torch.rand(rows, t, generator=g) < 0.2] = -100
    ref = torch.rand(rows, t, generator=g) * 3
    ref[torch.rand(rows, t, generator=g) < 0.1] = float("nan")
    ref[:, 5] = 1.0  # some exact ties across ranks
    logits[:, 5] = 0.0
    token_loss = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100,
                                 reduction="none").view(rows, t)
    return token_loss, labels, ref


if __name__ == "__main__":
    accelerator = make_accelerator()
    token_loss, labels, ref = global_batch()
    per = token_loss.shape[0] // accelerator.num_processes
    mine = slice(accelerator.process_index * per, (accelerator.process_index + 1) * per)
    for score in ("excess", "random"):
        sel = select_from_token_loss(token_loss[mine], labels[mine], ref[mine], 0.37, score,
                                     generator=torch.Generator().manual_seed(3), gather=accelerator.gather,
                                     rank=accelerator.process_index)
        mask = accelerator.gather(sel.mask.to(torch.uint8))
        total = accelerator.reduce(sel.loss.detach(), "sum")
        if accelerator.is_main_process:
            torch.save({"mask": mask.bool(), "loss": total}, f"{sys.argv[1]}.{score}.pt")
    accelerator.end_training()  # leave the process group together, so neither side aborts on exit
