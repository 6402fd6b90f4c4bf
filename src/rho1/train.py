"""`rho1 train`: one loop for reference, CLM and SLM training, on accelerate.

Reads top to bottom: set up, then for each optimizer step take the next windows of the seeded
order, forward each micro-batch, keep the selected tokens' loss, step, log, evaluate, save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedType
from safetensors import SafetensorError

from rho1.accel import compute_dtype, make_accelerator
from rho1.config import Interrupted, TrainConfig
from rho1.data.loader import IGNORE_INDEX, WindowOrder, make_batch
from rho1.data.store import ScoreStore, TokenStore, check_writable, sha256_file
from rho1.evaluate import batch_token_losses, fixed_selection, linear_head_of, summarize, token_losses
from rho1.model import build_model, check_model_fits, load_model, save_checkpoint, without_head
from rho1.progress import progress_bar
from rho1.selection import (
    num_selected,
    select_from_token_loss,
    selective_linear_cross_entropy,
    token_cross_entropy,
    valid_mask,
)


def selection_seed(cfg: TrainConfig, step: int, micro: int, rank: int, global_scope: bool = False) -> int:
    """The seed of the random control's scores: its own stream for each step and micro-batch, and for each
    process when each ranks its own micro-batch (rank 0 keeps the single-process stream). Under the
    global scope every process draws the scores of the whole gathered batch, so they share the stream."""
    return cfg.seed * 1_000_003 + step * cfg.grad_accum + micro + (0 if global_scope else rank * 7_919_000_001)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def all_finite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """True when the value is finite on every process (they must agree, or DDP would wait forever)."""
    bad = torch.tensor(0.0 if torch.isfinite(value).all() else 1.0, device=accelerator.device)
    return float(accelerator.reduce(bad, "sum")) == 0.0


def checkpoints(out: Path) -> list[Path]:
    """Complete resumable checkpoints of a run, oldest first."""
    root = out / "checkpoints"
    found = [p for p in root.iterdir() if p.name.isdigit() and (p / "rho1_state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def write_training_state(path: Path, state: dict) -> None:
    files = {f.name: sha256_file(f) for f in sorted(path.glob("*.safetensors"))}
    (path / "rho1_state.json").write_text(json.dumps({**state, "sha256": files}, indent=2))


def read_training_state(path: Path) -> dict:
    """Our position in a checkpoint, after checking its weights against the hashes written with it."""
    state = json.loads((path / "rho1_state.json").read_text())
    for name, digest in state.get("sha256", {}).items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise ValueError(f"checkpoint file {path / name} is missing or corrupted (hash mismatch); delete "
                             f"{path} to resume from the checkpoint before it")
    return state


def online_reference_loss(ref_model, head_of, batch, autocast, dtype=None) -> torch.Tensor:
    """The reference model's loss of each label of a batch, as a ScoreStore would hold it: NaN where there
    is no label, rounded to float16 like stored scores, so online and offline select the same tokens."""
    losses = batch_token_losses(ref_model, batch.input_ids, batch.labels, autocast, head_of, dtype)
    return torch.where(batch.labels != IGNORE_INDEX, losses.half().float(), torch.nan)


class Evaluator:
    """Held-out metrics at a checkpoint. The selected/unselected split of each held-out store is fixed
    at the first evaluation (top ``ratio`` by excess loss of the starting model), so the curves of
    different runs (CLM, SLM, ablations) from the same starting model compare the same tokens."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, resuming: bool = False):
        self.cfg, self.accelerator = cfg, accelerator
        self.head_of = None  # set by train() to the unwrapped model when its head is plain linear
        self.stores = [TokenStore.open(p).verify() for p in cfg.eval_data]
        scores = cfg.eval_scores or [""] * len(self.stores)
        score_stores = [ScoreStore.open(s, st).verify() if s else None for s, st in zip(scores, self.stores)]
        for s in score_stores:
            if s is not None and s.seq_len != cfg.seq_len:
                raise ValueError(f"eval scores {s.path} use windows of {s.seq_len} tokens but --seq-len is "
                                 f"{cfg.seq_len}; rescore with --seq-len {cfg.seq_len}")
        # per-token reference losses of each held-out store; with an online reference model, computed once
        self.refs = [None if s is None else np.asarray(s.scores, np.float32) for s in score_stores]
        self.reference = None  # set by train() to (model, head_of) when --reference is given
        self.names = [Path(p).name for p in cfg.eval_data]
        self.selected: list[np.ndarray | None] = [None] * len(self.stores)
        # kept in the run directory so a resumed run compares the same tokens
        self.selected_paths = [Path(cfg.out) / f"eval_selection_{i}.npy" for i in range(len(self.stores))]
        for i, path in enumerate(self.selected_paths):
            if resuming and path.is_file():  # a run started over recomputes it (a stale file is not reused)
                self.selected[i] = np.load(path, allow_pickle=False)

    def __call__(self, model) -> dict:
        metrics = {}
        dtype = compute_dtype(self.cfg.precision)
        for i, (name, store) in enumerate(zip(self.names, self.stores)):
            n = store.num_windows(self.cfg.seq_len)
            windows = np.arange(min(n, self.cfg.eval_max_windows) if self.cfg.eval_max_windows else n)
            losses = token_losses(model, store, self.cfg.seq_len, self.cfg.batch_size, windows,
                                  autocast=self.accelerator.autocast, head_of=self.head_of, dtype=dtype)
            if self.refs[i] is None and self.reference is not None:
                ref_model, ref_head = self.reference
                self.refs[i] = token_losses(ref_model, store, self.cfg.seq_len, self.cfg.batch_size, windows,
                                            autocast=self.accelerator.autocast, head_of=ref_head, dtype=dtype)
            if self.refs[i] is not None and self.selected[i] is None:
                self.selected[i] = fixed_selection(losses, self.refs[i], self.cfg.ratio)
                if self.accelerator.is_main_process:
                    self.selected_paths[i].parent.mkdir(parents=True, exist_ok=True)
                    np.save(self.selected_paths[i], self.selected[i], allow_pickle=False)
            for key, value in summarize(losses, store, self.refs[i], self.selected[i]).items():
                metrics[f"eval/{name}/{key}"] = value
        return metrics


def check_run_folder(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start), after refusing an --out that would mix two runs."""
    check_writable(out)
    if resume:
        return latest_checkpoint(out)
    if (out / "final").exists() or checkpoints(out):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it, or another --out "
                         "(or delete it) to start over")
    if out.is_dir() and not (out / "config.yaml").is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder that holds other files; choose a new or empty folder")
    return None


class CheckpointError(OSError):
    """A checkpoint could not be written; the message says what happened and what is intact."""


def checkpoint_error(path: Path, err: BaseException, previous: Path | None) -> CheckpointError:
    text = " ".join(str(err).split())
    free = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free
    # torch reports a short write as "unexpected pos" or "file write failed", safetensors as StorageFull
    full = getattr(err, "errno", None) == errno.ENOSPC or free < (16 << 20) or any(
        s in text for s in ("No space left", "StorageFull", "file write failed"))
    what = f"the disk is full: {free / 2**20:.1f} MiB free" if full else f"{type(err).__name__}: {text[:200]}"
    fix = "free space" if full else "fix that"
    return CheckpointError(f"could not write checkpoint {path} ({what}); " + (
        f"the previous checkpoint {previous} is intact: {fix} and rerun with --resume" if previous
        else f"no earlier checkpoint exists: {fix} and run again"))


def interrupted_message(out: Path, step: int, tokens: int) -> str:
    newest = latest_checkpoint(out)
    where = f"interrupted at step {step} ({tokens:,} tokens); "
    if newest is None:
        return where + "no checkpoint was saved yet (--save-every N saves them): run the same command to start over"
    return where + f"the newest checkpoint is {newest}: rerun the same command with --resume to continue from it"


def _drop_tied_duplicates(models, weights, output_dir) -> None:
    """accelerate's save_state pre-hook: keep one name of each tied tensor (lm_head.weight is the input
    embedding in a tied model), as transformers saves them, instead of accelerate removing it with a
    warning; loading re-ties them."""
    for state in weights:
        seen = set()
        for name in list(state):
            tensor = state[name]
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                del state[name]
            seen.add(key)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    resume_from = check_run_folder(out, cfg.resume)
    accelerator = make_accelerator(cfg.precision)
    accelerator.register_save_state_pre_hook(_drop_tied_duplicates)
    store = TokenStore.open(cfg.data).verify()
    scores = ScoreStore.open(cfg.scores, store).verify() if cfg.scores else None
    if scores is not None and scores.seq_len != cfg.seq_len:
        raise ValueError(f"scores {scores.path} were computed with windows of {scores.seq_len} tokens but --seq-len is "
                         f"{cfg.seq_len}; train with --seq-len {scores.seq_len} or rescore with --seq-len {cfg.seq_len}")
    tokenizer = store.tokenizer()
    if cfg.model:
        model = load_model(cfg.model, cfg.trust_remote_code)
        check_model_fits(model, store, cfg.model)
    else:
        model = build_model(cfg.model_preset, store.vocab_size, max(cfg.seq_len, 2048),
                            store.manifest["eos_token_id"], tokenizer.pad_token_id, seed=cfg.seed)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's {model.config.max_position_embeddings} positions")
    evaluator = Evaluator(cfg, accelerator, resuming=resume_from is not None)
    ref_model = ref_head = None
    if cfg.reference:  # frozen: held in the compute dtype under mixed precision, like `rho1 score` does
        ref_model = load_model(cfg.reference, cfg.trust_remote_code, dtype=compute_dtype(cfg.precision))
        ref_model = ref_model.to(accelerator.device).eval().requires_grad_(False)
        check_model_fits(ref_model, store, cfg.reference)
        ref_head = linear_head_of(ref_model, store, cfg.seq_len)
        evaluator.reference = (ref_model, ref_head)

    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    # FSDP/DeepSpeed shard the head weight outside the forward: they keep the full-logits path
    chunked_head = (cfg.loss_impl == "auto" and accelerator.distributed_type in
                    (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
                    and linear_head_of(unwrapped, store, cfg.seq_len) is not None)
    head_dtype = compute_dtype(cfg.precision)
    evaluator.head_of = unwrapped if chunked_head else None

    n_proc, rank = accelerator.num_processes, accelerator.process_index
    windows_per_step = cfg.batch_size * cfg.grad_accum * n_proc
    tokens_per_step = windows_per_step * cfg.seq_len
    total_steps = math.ceil(cfg.max_tokens / tokens_per_step)
    order = WindowOrder(store.num_windows(cfg.seq_len), cfg.seed)
    ratio = cfg.ratio if cfg.objective == "slm" else 1.0
    selecting = ratio < 1.0  # slm at ratio 1 keeps every token: exactly clm
    global_scope = selecting and cfg.selection_scope == "global" and n_proc > 1
    gather = accelerator.gather if global_scope else None
    run_name = f"{cfg.objective} ({cfg.score})" if selecting and cfg.score != "excess" else cfg.objective

    step = tokens = 0
    next_eval = cfg.eval_every or math.inf
    next_save = cfg.save_every or math.inf
    if cfg.resume and resume_from is None and progress and accelerator.is_main_process:
        print(f"train: no checkpoint in {out} to resume from; starting from the beginning")
    if resume_from is not None:
        state = read_training_state(resume_from)
        accelerator.load_state(str(resume_from / "state"))
        step, tokens, next_eval, next_save = state["step"], state["tokens"], state["next_eval"], state["next_save"]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        if resume_from is not None:  # drop what the killed run logged after its last checkpoint
            kept = [line for line in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["step"] <= step]
            (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
            print(f"train: resuming from {resume_from} (step {step}, {tokens:,} tokens)")
        metrics_file = open(out / "metrics.jsonl", "a" if resume_from is not None else "w")
    n_params = sum(p.numel() for p in model.parameters())

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def evaluate(step: int, tokens: int) -> dict:
        if not evaluator.stores:
            return {}
        metrics = evaluator(model)  # the wrapped model: under FSDP every process takes part in each forward
        log({"kind": "eval", "step": step, "tokens": tokens, **metrics})
        return metrics

    def save_final(path: Path, step: int, tokens: int) -> None:
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)  # a collective under FSDP/DeepSpeed: every process calls it
        if accelerator.is_main_process:
            save_checkpoint(accelerator.unwrap_model(model), tokenizer, path,
                            {"step": step, "tokens": tokens, "objective": cfg.objective, "ratio": ratio}, state_dict)

    def save_resumable(step: int, tokens: int) -> None:
        """A HF checkpoint plus the accelerate state (optimizer, RNG) and our position, written beside the
        final name and renamed into place, so a kill or a full disk leaves the previous one intact."""
        path = out / "checkpoints" / str(tokens)
        tmp = path.with_name(path.name + ".partial")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp / "state"))
            state_dict = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                save_checkpoint(accelerator.unwrap_model(model), tokenizer, tmp, state_dict=state_dict)
                write_training_state(tmp, {"step": step, "tokens": tokens, "next_eval": next_eval,
                                           "next_save": next_save, "objective": cfg.objective, "ratio": ratio})
        except (OSError, RuntimeError, SafetensorError) as err:  # torch and safetensors wrap I/O errors
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint_error(path, err, latest_checkpoint(out)) from err
        if accelerator.is_main_process:
            os.replace(tmp, path)
            for old in checkpoints(out)[: -cfg.keep_last] if cfg.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def nonfinite(what: str, step: int, tokens: int) -> None:
        message = f"{what} at step {step} ({tokens:,} tokens); the weights were not updated"
        if not cfg.skip_nonfinite:
            raise FloatingPointError(f"{message}: lower --lr, use --precision no if you train in fp16/bf16, or "
                                     "pass --skip-nonfinite to skip such steps")
        log({"kind": "skipped", "step": step + 1, "tokens": tokens, "reason": what})
        if progress and accelerator.is_main_process:
            print(f"train: skipped a step: {message}")

    def micro_selection(batch, ref_loss, ratio: float, score: str, generator=None):
        """Forward one micro-batch and select its tokens; the loss keeps the graph."""
        if chunked_head:
            with without_head(unwrapped) as weight, accelerator.autocast():
                hidden = model(input_ids=batch.input_ids).logits
            if head_dtype is not None:
                hidden = hidden.to(head_dtype)
            return selective_linear_cross_entropy(hidden, weight, batch.labels, ref_loss, ratio, score,
                                                  generator=generator, gather=gather, rank=rank)
        with accelerator.autocast():
            logits = model(input_ids=batch.input_ids).logits
        return select_from_token_loss(token_cross_entropy(logits, batch.labels), batch.labels, ref_loss, ratio, score,
                                      generator=generator, gather=gather, rank=rank)

    start_time = time.time()
    last_eval = evaluate(0, 0) if resume_from is None else {}
    first_step, first_tokens = step, tokens
    bar = progress_bar(total=total_steps * tokens_per_step, initial=tokens, desc=f"train {run_name}", unit="tok",
               unit_scale=True, disable=not (progress and accelerator.is_main_process))
    running: dict[str, list[float]] = {}
    log_loss, log_selected = torch.zeros((), device=accelerator.device), 0.0  # since the last logged record
    try:
        for step in range(first_step, total_steps):
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_windows = order.take(step * windows_per_step, windows_per_step)
            micro = [make_batch(store, step_windows[(m * n_proc + rank) * cfg.batch_size:][: cfg.batch_size],
                                cfg.seq_len, scores).to(accelerator.device) for m in range(cfg.grad_accum)]
            if ref_model is not None:
                for batch in micro:
                    batch.ref_loss = online_reference_loss(ref_model, ref_head, batch, accelerator.autocast, head_dtype)
            # One selection covers one micro-batch: this process's (micro scope) or the same micro-batch index
            # on every process (global scope). The loss is normalised by the tokens selected over the whole
            # step (all micro-batches, all processes), so accumulation and data parallelism keep the objective.
            valid_counts = torch.tensor([float(valid_mask(b.labels, b.ref_loss if selecting else None).sum())
                                         for b in micro], device=accelerator.device)
            if global_scope:
                counts = [num_selected(int(c), ratio) for c in accelerator.reduce(valid_counts, "sum").tolist()]
                step_selected = torch.tensor(float(sum(counts)), device=accelerator.device)
            else:
                counts = [num_selected(int(c), ratio) for c in valid_counts.tolist()]
                step_selected = accelerator.reduce(torch.tensor(float(sum(counts)), device=accelerator.device), "sum")
            step_loss, grad_norm = torch.zeros((), device=accelerator.device), None
            for m, batch in enumerate(micro):
                if selecting:
                    generator = torch.Generator().manual_seed(selection_seed(cfg, step, m, rank, global_scope))
                    selection = micro_selection(batch, batch.ref_loss, ratio, cfg.score, generator)
                    stats = selection.stats
                else:
                    selection = micro_selection(batch, None, 1.0, "learner")
                    stats = selection.stats
                    if batch.ref_loss is not None:  # CLM with scores: log what SLM would have kept
                        shadow = select_from_token_loss(selection.token_loss, batch.labels, batch.ref_loss, cfg.ratio)
                        stats = {**shadow.stats, "frac_selected": 1.0}
                loss = selection.loss_sum * n_proc / step_selected
                if not all_finite(accelerator, loss):
                    nonfinite(f"training loss became {float(loss.detach())}", step, tokens)
                    break
                with accelerator.no_sync(model) if m < cfg.grad_accum - 1 else contextlib.nullcontext():
                    accelerator.backward(loss)
                step_loss += selection.loss_sum.detach()
                for key, value in stats.items():
                    running.setdefault(key, []).append(value)
            else:  # every micro-batch was finite
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
                if grad_norm is not None and not all_finite(accelerator, grad_norm):
                    nonfinite(f"gradient norm became {float(grad_norm)}", step, tokens)
                else:
                    optimizer.step()
                    log_loss, log_selected = log_loss + step_loss, log_selected + float(step_selected)
                    if grad_norm is not None:
                        running.setdefault("grad_norm", []).append(float(grad_norm))
            optimizer.zero_grad(set_to_none=True)
            tokens += tokens_per_step
            bar.update(tokens_per_step)

            if (step + 1) % cfg.log_every == 0 or step == total_steps - 1:
                # loss: over every selected token of the steps since the last record; the rest: mean per step
                loss_sum = float(accelerator.reduce(log_loss, "sum"))
                elapsed = time.time() - start_time
                record = {"kind": "train", "step": step + 1, "tokens": tokens,
                          "loss": loss_sum / log_selected if log_selected else float("nan"), "selected": int(log_selected),
                          "lr": lr, "grad_norm": None,
                          "tokens_per_second": (tokens - first_tokens) / elapsed}
                record.update({k: _nanmean(v) for k, v in running.items()})
                running, log_loss, log_selected = {}, torch.zeros((), device=accelerator.device), 0.0
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if tokens >= next_eval and step < total_steps - 1:
                last_eval = evaluate(step + 1, tokens)
                next_eval += cfg.eval_every
            if tokens >= next_save and step < total_steps - 1:
                next_save += cfg.save_every
                save_resumable(step + 1, tokens)
    except KeyboardInterrupt:
        bar.close()
        if accelerator.is_main_process:
            metrics_file.close()
        raise Interrupted(interrupted_message(out, step, tokens)) from None
    except BaseException:
        if accelerator.is_main_process:
            metrics_file.close()  # a kept traceback must not hold the run folder's file open
        raise
    bar.close()
    last_eval = evaluate(total_steps, tokens)
    save_final(out / "final", total_steps, tokens)
    seconds = time.time() - start_time
    summary = {"tokens": tokens, "steps": total_steps, "seconds": seconds,
               "tokens_per_second": (tokens - first_tokens) / seconds,
               "parameters": n_params, "loss_path": "chunked" if chunked_head else "logits", **last_eval}
    if accelerator.is_main_process:
        metrics_file.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if progress:
            shown = ", ".join(f"{k.split('/', 1)[-1]} {v:.4f}" for k, v in last_eval.items()
                              if isinstance(v, float) and k.endswith("loss"))
            print(f"train {run_name}: {tokens:,} tokens in {seconds:.1f}s ({summary['tokens_per_second']:,.0f} tokens/s, "
                  f"{n_params / 1e6:.2f}M parameters) -> {out / 'final'}" + (f"; {shown}" if shown else ""))
    accelerator.wait_for_everyone()
    return summary
