"""`rho1 train`: one loop for reference, CLM and SLM training, on accelerate. Read this first.

``train`` = ``setup`` (train/build.py: data, models, optimizer, evaluator, checkpoints) then ``fit`` (here: the
optimizer steps, logging, evaluations, checkpoints, the final model and summary). Each step is ``train_step``
(train/step.py); the in-loop reference, stored, online or the learner itself, is train/reference.py; what is
logged, train/metrics.py; checkpoints and exact resume, train/checkpoint.py.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from rho1.compute import format_flops, mfu, peak_memory_mib, reset_peak_memory
from rho1.config import TrainConfig
from rho1.interrupt import Interrupted, stop_if_ctrl_c
from rho1.model import dropout_of
from rho1.progress import progress_bar
from rho1.train.build import setup
from rho1.train.checkpoint import latest_checkpoint
from rho1.train.metrics import LogWindow, step_flops
from rho1.train.reference import after_step
from rho1.train.run import Run
from rho1.train.step import StepResult, train_step


def evaluate(run: Run) -> dict:
    if not run.evaluator.stores:
        return {}
    metrics = run.evaluator(run.model)
    run.log.write({"kind": "eval", "step": run.step, "tokens": run.tokens, "flops": run.flops, **metrics})
    return metrics


def skip_or_stop(run: Run, what: str, progress: bool) -> None:
    """A step with a NaN/inf loss or gradient: stop with one sentence, or with --skip-nonfinite log it."""
    message = f"{what} at step {run.step} ({run.tokens:,} tokens); the weights were not updated"
    if not run.cfg.skip_nonfinite:
        raise FloatingPointError(f"{message}: lower --lr, use --precision no if you train in fp16/bf16, or "
                                 "pass --skip-nonfinite to skip such steps")
    run.log.write({"kind": "skipped", "step": run.step + 1, "tokens": run.tokens, "reason": what})
    if progress and run.accelerator.is_main_process:
        print(f"train: skipped a step: {message}")


def interrupted_message(run: Run) -> str:
    newest = latest_checkpoint(Path(run.cfg.out))
    where = f"interrupted at step {run.step} ({run.tokens:,} tokens); "
    if newest is None:
        return where + "no checkpoint was saved yet (--save-every N saves them): run the same command to start over"
    return where + f"the newest checkpoint is {newest}: rerun the same command with --resume to continue from it"


EMPTY_STEPS = 10  # steps in a row without a selected token before a run stops: it is training on nothing


class EmptySelection:
    """Consecutive optimizer steps that selected no token, and what their scores looked like."""

    def __init__(self):
        self.steps, self.valid, self.low, self.high = 0, 0.0, math.inf, -math.inf

    def add(self, result: StepResult) -> None:
        if result.skipped or result.selected > 0:
            self.__init__()
            return
        self.steps, self.valid = self.steps + 1, self.valid + result.valid
        if result.score_range is not None:
            self.low, self.high = min(self.low, result.score_range[0]), max(self.high, result.score_range[1])

    def message(self, run: Run) -> str:
        cfg = run.cfg
        what = f"no token was selected in {self.steps} steps in a row (up to step {run.step})"
        seen = f"scores seen from {self.low:.4g} to {self.high:.4g}" if self.low <= self.high else ""
        if self.valid == 0 and (cfg.train_on == "target" or cfg.selection):
            why = ("no window of these steps holds a token that " + ("--selection " + cfg.selection + " labelled"
                   if cfg.selection else "--train-on target keeps (an answer token)") + "; check that the store's "
                   "target tokens (or the export's labels) are there, or use --train-on all")
        elif self.valid == 0:
            why = ("no token has a finite reference loss (every score is NaN): rescore --data with `rho1 score`, or "
                   "check that --scores was made from it")
        elif not seen:
            why = f"--score {cfg.score} gave no token a finite score (NaN or inf for every token)"
        elif cfg.rule == "threshold":
            why = f"--threshold {cfg.threshold:g} is above every score ({seen}); lower --threshold"
        else:
            why = f"--rule {cfg.rule} gave every token a weight of 0 ({seen})"
        return f"{what}: {why}; the run stopped, since it was training on nothing"


def fit(run: Run, progress: bool = True) -> dict:
    """The optimizer steps from the run's position to the end, then the final evaluation and checkpoint;
    the lock of --out is released at the end, however it ends."""
    with run.held:
        try:
            return _fit(run, progress)
        finally:
            for tracker in run.accelerator.trackers:  # not end_training(): that also ends the process group
                tracker.finish()


def _fit(run: Run, progress: bool) -> dict:
    cfg, acc = run.cfg, run.accelerator
    start, first_tokens, run.load_peaks = time.time(), run.tokens, reset_peak_memory(acc.device)
    last_eval = evaluate(run) if run.resumed_from is None else {}
    bar = progress_bar(total=run.total_steps * run.tokens_per_step, initial=run.tokens, desc=f"train {run.name}",
                       unit="tok", unit_scale=True, disable=not (progress and acc.is_main_process))
    window, empty = LogWindow(acc.device), EmptySelection()
    run.train_seconds = 0.0
    try:
        for step in range(run.step, run.total_steps):
            stop_if_ctrl_c()
            began = time.perf_counter()
            result = train_step(run, step)
            run.optimizer.zero_grad(set_to_none=True)
            if acc.device.type == "cuda":  # the optimizer step is queued: count its time in this step's
                torch.cuda.synchronize(acc.device)
            seconds = time.perf_counter() - began
            run.train_seconds += seconds
            flops = step_flops(run, result)
            run.train_flops += flops
            run.flops += flops * acc.num_processes
            if result.skipped:
                skip_or_stop(run, result.skipped, progress)
            else:
                window.add(result, seconds, flops)
            run.step, run.tokens = step + 1, run.tokens + run.tokens_per_step
            after_step(run)
            bar.update(run.tokens_per_step)
            empty.add(result)
            if empty.steps >= min(EMPTY_STEPS, run.total_steps):
                raise ValueError(empty.message(run))
            last = run.step == run.total_steps
            if run.step % cfg.log_every == 0 or last:
                record = window.record(run, result.lr, (run.tokens - first_tokens) / (time.time() - start))
                run.log.write(record)
                shown = {"loss": f"{record['loss']:.3f}"}
                if record["mfu"] is not None:
                    shown["mfu"] = f"{record['mfu']:.1%}"
                bar.set_postfix(shown, refresh=False)
            if run.tokens >= run.next_eval and not last:
                last_eval = evaluate(run)
                run.next_eval += cfg.eval_every
            if run.tokens >= run.next_save and not last:
                run.next_save += cfg.save_every
                run.checkpointer.save(run.model, run.position())
    except KeyboardInterrupt:
        bar.close()
        run.log.close()
        raise Interrupted(interrupted_message(run)) from None
    except BaseException:
        bar.close()
        run.log.close()  # a kept traceback must not hold the run folder's file open
        raise
    bar.close()
    last_eval = evaluate(run)
    run.checkpointer.save_final(run.model, {"step": run.step, "tokens": run.tokens, "objective": cfg.objective,
                                            "ratio": run.ratio})
    return finish(run, last_eval, time.time() - start, first_tokens, progress)


def finish(run: Run, last_eval: dict, seconds: float, first_tokens: int, progress: bool) -> dict:
    """summary.json and the closing line."""
    out = Path(run.cfg.out)
    per_process = (run.tokens - first_tokens) / run.accelerator.num_processes / max(run.train_seconds, 1e-9)
    utilisation, why_not = mfu(run.train_flops / max(run.train_seconds, 1e-9), run.peak) if run.train_seconds \
        else (None, "no optimizer step ran")
    summary = {"tokens": run.tokens, "steps": run.total_steps, "seconds": seconds, "train_flops": run.flops,
               "tokens_per_second": (run.tokens - first_tokens) / seconds, "parameters": run.parameters,
               "processes": run.accelerator.num_processes, "tokens_per_second_per_process": per_process,
               "mfu": utilisation, "peak_flops": run.peak[0],
               "peak_flops_from": run.peak[1], "mfu_not_shown": why_not, "flops_per_token": run.flops_per_token,
               "attn_implementation": getattr(run.accelerator.unwrap_model(run.model).config, "_attn_implementation",
                                              None),
               "gradient_checkpointing": run.cfg.gradient_checkpointing, "torch_compile": run.cfg.torch_compile,
               **run.load_peaks, **peak_memory_mib(run.accelerator.device),
               "threads": torch.get_num_threads(), "dtype": str(next(run.model.parameters()).dtype).removeprefix("torch."),
               "saved_dtype": str(run.checkpointer.dtype).removeprefix("torch."),
               "dropout": dropout_of(run.accelerator.unwrap_model(run.model)),
               "loss_path": "chunked" if run.chunked_head else "logits", **last_eval}
    run.log.close()
    if run.accelerator.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if progress:
            shown = ", ".join(f"{k.split('/', 1)[-1]} {v:.4f}" for k, v in last_eval.items()
                              if isinstance(v, float) and k.endswith("loss"))
            util = (f"MFU {utilisation:.1%} of a {format_flops(run.peak[0])} peak ({run.peak[1]})"
                    if utilisation is not None else f"MFU not shown: {why_not}")
            print(f"train {run.name}: {run.tokens:,} tokens in {seconds:.1f}s ({summary['tokens_per_second']:,.0f} "
                  f"tokens/s, {run.parameters / 1e6:.2f}M parameters, {summary['threads']} threads) -> {out / 'final'}; "
                  f"{util}" + (f"; {shown}" if shown else ""))
            if run.selecting and (note := reference_note(last_eval)):
                print(note)
    run.accelerator.wait_for_everyone()
    return summary


def reference_note(metrics: dict) -> str | None:
    """A word when the model ends better than the reference on a held-out target: from there the excess loss
    has little left to steer by (on real data, SLM with a reference trained under one pass over its data
    never caught up with CLM; trained for three passes, it did; see benchmarks/BENCHMARKS.md)."""
    for key, value in metrics.items():
        if key.endswith("/target_excess_loss") and isinstance(value, float) and value < 0:
            store = key.split("/")[1]
            return (f"note: the model now beats the reference on {store}'s target tokens (by {-value:.4f} nats a "
                    "token), so the excess loss has little left to select by; a reference trained longer or larger "
                    "usually helps")
    return None


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Train a causal LM with the CLM or SLM objective (see TrainConfig); returns the summary."""
    return fit(setup(cfg, progress), progress)
