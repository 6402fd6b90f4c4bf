"""What a run logs: metrics.jsonl (and the experiment trackers), one record per --log-every steps with the loss
over their selected tokens, throughput and MFU. (``run`` below is a rho1.train.run.Run and ``result`` a
rho1.train.step.StepResult; this module imports neither, as both build on it.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rho1.compute import mfu
from rho1.data.store import read_jsonl
from rho1.train.trackers import numbers


class MetricsLog:
    """The run's metrics.jsonl, written by the main process only, and the experiment trackers (--report-to)
    when there are any. A resumed run first drops what the killed run logged after its checkpoint."""

    def __init__(self, out: Path, is_main: bool, resume_step: int | None, accelerator=None):
        self.file, self.accelerator = None, accelerator
        if not is_main:
            return
        path = out / "metrics.jsonl"
        if resume_step is not None and path.is_file():  # a kill can cut the last record short: it goes too
            records = read_jsonl(path, "restore it or start the run over", torn_tail=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= resume_step))
        self.file = open(path, "a" if resume_step is not None else "w")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.accelerator is not None and self.accelerator.trackers:
                self.accelerator.log(numbers(record), step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class LogWindow:
    """The steps since the last metrics record: the loss over all their selected tokens, the mean of the
    rest per step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.selected, self.values, self.labels = torch.zeros((), device=self.device), 0.0, {}, None
        self.steps, self.seconds = 0, 0.0  # optimizer steps and their wall time (evaluations and saves left out)
        self.flops = 0.0  # model FLOPs of one process in those steps

    def add(self, result, seconds: float = 0.0, flops: float = 0.0) -> None:
        self.steps, self.seconds, self.flops = self.steps + 1, self.seconds + seconds, self.flops + flops
        self.loss_sum, self.selected = self.loss_sum + result.loss_sum, self.selected + result.selected
        for stats in result.stats:
            for key, value in stats.items():
                self.values.setdefault(key, []).append(value)
        if result.grad_norm is not None:
            self.values.setdefault("grad_norm", []).append(result.grad_norm)
        if result.labels is not None:
            self.labels = result.labels if self.labels is None else self.labels + result.labels

    def record(self, run, lr: float, tokens_per_second: float) -> dict:
        loss_sum = float(run.accelerator.reduce(self.loss_sum, "sum"))  # every process logs together
        per_process = self.steps * run.tokens_per_step / run.accelerator.num_processes / max(self.seconds, 1e-9)
        record = {"kind": "train", "step": run.step, "tokens": run.tokens,
                  "loss": loss_sum / self.selected if self.selected else float("nan"), "selected": int(self.selected),
                  "lr": lr, "grad_norm": None, "tokens_per_second": tokens_per_second,
                  "tokens_per_second_per_process": per_process,
                  "mfu": mfu(self.flops / max(self.seconds, 1e-9), run.peak)[0] if self.steps else None}
        for key, values in self.values.items():
            finite = [v for v in values if v == v]
            record[key] = sum(finite) / len(finite) if finite else float("nan")
        if self.labels is not None:  # per source: share of its tokens selected, their mean excess loss
            sums = run.accelerator.reduce(self.labels, "sum").tolist()
            for name, (valid, selected, excess, with_ref) in zip(run.store.label_names, sums):
                record[f"label/{name}/tokens"] = int(valid)
                record[f"label/{name}/frac_selected"] = selected / valid if valid else float("nan")
                record[f"label/{name}/excess_loss"] = excess / with_ref if with_ref else float("nan")
        self.reset()
        return record


def step_flops(run, result) -> float:
    """The model FLOPs one process did in a step: every token's forward and backward, less the head's backward
    of the tokens the chunked loss did not select."""
    tokens = run.tokens_per_step
    skipped_head = max(0.0, tokens - result.selected) * run.head_backward if not result.skipped else 0.0
    return (tokens * run.flops_per_token - skipped_head) / run.accelerator.num_processes
