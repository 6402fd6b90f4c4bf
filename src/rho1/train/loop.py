"""`rho1 train`: one loop for reference, CLM and SLM training, on accelerate.

Reads top to bottom: ``setup`` builds what a run needs (data, model, optimizer, evaluator, checkpoints),
``fit`` runs the optimizer steps (log, evaluate, save), and ``train_step`` is one optimizer step: take
the next windows of the seeded order, forward each micro-batch, keep the selected tokens' loss sum,
backward, then scale the gradients by the number of tokens selected over the whole step and every
process (known only after the forward, so any selection rule works), clip, update.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from rho1.accel import compute_dtype, everyone_agrees, hold_job_lock, make_accelerator
from rho1.align import load_reference
from rho1.config import Interrupted, TrainConfig, stop_if_ctrl_c
from rho1.data.loader import WindowOrder, make_batch, trainable_mask
from rho1.data.store import ScoreStore, TokenStore, check_writable, open_with_scores, read_jsonl
from rho1.head import chunked_head_supported, forward_selection, linear_head_of, reference_token_losses
from rho1.lock import check_not_inside
from rho1.model import (
    advance_reference,
    build_model,
    check_model_fits,
    check_positions,
    dropout_of,
    load_model,
    stored_dtype,
)
from rho1.progress import progress_bar
from rho1.selection import (
    Selection,
    select_from_token_loss,
    valid_mask,
)
from rho1.threads import set_threads
from rho1.train.checkpoint import (
    Checkpointer,
    check_run_folder,
    check_same_recipe,
    latest_checkpoint,
    read_training_state,
)
from rho1.train.evaluator import Evaluator
from rho1.train.throughput import flops_per_token, format_flops, head_backward_flops, mfu, peak_flops, peak_memory_mib
from rho1.train.trackers import numbers, tracker_config, trackers


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


def make_optimizer(model, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; ``fused`` (on CUDA) updates every parameter in one kernel."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))


def all_finite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """True when the value is finite on every process (they must agree, or DDP would wait forever)."""
    return everyone_agrees(accelerator, bool(torch.isfinite(value).all()))


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


@dataclass
class Run:
    """Everything one training run holds; ``step``, ``tokens``, ``next_eval`` and ``next_save`` move."""

    cfg: TrainConfig
    accelerator: Accelerator
    store: TokenStore
    scores: ScoreStore | None
    model: torch.nn.Module  # as accelerate prepared it
    optimizer: torch.optim.Optimizer
    order: WindowOrder
    reference: tuple | None  # (model, head_of) of a reference model run in the loop (--reference MODEL or self)
    chunked_head: bool  # the loss from the head's input (rho1.selection.linear_ce)
    evaluator: Evaluator
    checkpointer: Checkpointer
    log: MetricsLog
    resumed_from: Path | None = None
    train_seconds: float = 0.0  # wall time of this process's optimizer steps
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the --out lock, released by fit
    step: int = 0
    tokens: int = 0
    next_eval: float = math.inf
    next_save: float = math.inf
    parameters: int = 0
    flops_per_token: float = 0.0  # training FLOPs of one token (rho1.train.throughput)
    head_backward: float = 0.0  # of which the head's backward, skipped for unselected tokens by the chunked loss
    train_flops: float = 0.0  # the model FLOPs of this process's optimizer steps
    peak: tuple = (None, "")  # peak FLOP/s of one device and where that number comes from
    keep: object = None  # 1 per stream position that may be trained on (--train-on target, --selection), or None

    @property
    def ratio(self) -> float:
        return self.cfg.ratio if self.cfg.objective == "slm" else 1.0

    @property
    def selecting(self) -> bool:  # slm with topk at ratio 1 keeps every token: exactly clm
        return self.cfg.objective == "slm" and (self.ratio < 1.0 or self.cfg.rule != "topk")

    @property
    def windows_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.cfg.seq_len

    @property
    def total_steps(self) -> int:
        return math.ceil(self.cfg.max_tokens / self.tokens_per_step)

    @property
    def name(self) -> str:
        cfg = self.cfg
        extra = [x for x in (cfg.score if cfg.score != "excess" else "", cfg.rule if cfg.rule != "topk" else "") if x]
        return f"{cfg.objective} ({', '.join(extra)})" if self.selecting and extra else cfg.objective

    def position(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "next_eval": self.next_eval, "next_save": self.next_save,
                "objective": self.cfg.objective, "ratio": self.ratio, "token_store_hash": self.store.hash,
                "tokens_per_step": self.tokens_per_step,
                "scores_hash": scores_hash(self.scores), "selection_hash": selection_hash(self.cfg.selection)}


def scores_hash(scores: ScoreStore | None) -> str | None:
    return None if scores is None else (scores.manifest.get("sha256") or {}).get("scores.bin")


def selection_hash(export: str | None) -> str | None:
    """An export's identity: its manifest names the store, scores, model, rule and ratio it was made with."""
    from rho1.data.store import sha256_file

    return None if not export else sha256_file(Path(export) / "manifest.json")


def _learner(cfg: TrainConfig, store: TokenStore, tokenizer):
    check_attention(cfg.attn_implementation)
    if cfg.model:
        model = load_model(cfg.model, cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
        check_model_fits(model, store, cfg.model)
    else:
        model = build_model(cfg.model_preset, store.vocab_size, max(cfg.seq_len, 2048),
                            store.manifest["eos_token_id"], tokenizer.pad_token_id, seed=cfg.seed,
                            attn_implementation=cfg.attn_implementation)
    check_positions(model, cfg.seq_len, cfg.model or f"preset {cfg.model_preset}")
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; drop "
                             "--gradient-checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def check_attention(name: str | None) -> None:
    """flash_attention_2 needs its package and a CUDA GPU: one sentence before a model is loaded."""
    if name != "flash_attention_2":
        return
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError("--attn-implementation flash_attention_2 needs a CUDA GPU; use sdpa (the default) here")
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError("--attn-implementation flash_attention_2 needs the flash-attn package (pip install "
                         "flash-attn --no-build-isolation); or use sdpa (the default)")


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (as torchtune and torchtitan do): the layers are where the time
    goes, the weights keep their names, and the selective loss, which replaces the head's forward for a call,
    stays eager. Returns the number of layers compiled."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"--torch-compile compiles decoder layers, and {type(model).__name__} names none "
                         "(_no_split_modules); drop --torch-compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def _reference(cfg: TrainConfig, store: TokenStore, accelerator, learner) -> tuple | None:
    """A frozen reference model run in the loop, held in the compute dtype like `rho1 score` holds it; with
    --reference self a copy of the learner's starting weights, in their own dtype (an EMA needs them)."""
    if not cfg.reference:
        return None
    if cfg.reference == "self":
        from accelerate import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                            DistributedType.MEGATRON_LM):
            raise ValueError("--reference self keeps a whole copy of the learner on each process, which runs on one "
                             f"process or under DDP, not under {accelerator.distributed_type.value}: score with a "
                             "reference (`rho1 score`) instead")
        model = copy.deepcopy(learner).to(accelerator.device).eval().requires_grad_(False)
        return model, linear_head_of(model, store, cfg.seq_len)
    model = load_reference(cfg.reference, store, cfg.cross_tokenizer, compute_dtype(cfg.precision),
                           cfg.trust_remote_code)
    model = model.to(accelerator.device).eval().requires_grad_(False)
    return model, None if cfg.cross_tokenizer else linear_head_of(model, store, cfg.seq_len)


def setup(cfg: TrainConfig, progress: bool = True) -> Run:
    """Check everything, then build the run: data, models, optimizer, evaluator, resumed position. The run
    holds the lock of --out until ``fit`` ends."""
    cfg.check()
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    out = Path(cfg.out)
    check_writable(out)
    check_not_inside(out, [("--data", cfg.data), ("--scores", cfg.scores), ("--model", cfg.model),
                           ("--reference", cfg.reference if cfg.reference != "self" else None),
                           ("--selection", cfg.selection), *(("--eval-data", p) for p in cfg.eval_data)])
    report_to = trackers(cfg.report_to)
    accelerator = make_accelerator(cfg.precision, report_to, out / "trackers")
    held = contextlib.ExitStack()
    try:
        hold_job_lock(held, accelerator, out, "rho1 train")
        return _setup(cfg, accelerator, held, progress)
    except BaseException:
        held.close()
        raise


def _setup(cfg: TrainConfig, accelerator, held: contextlib.ExitStack, progress: bool) -> Run:
    out = Path(cfg.out)
    resume_from = check_run_folder(out, cfg.resume)
    store, scores = open_with_scores(cfg.data, cfg.scores, cfg.seq_len)
    state = read_training_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_same_recipe(out, cfg, state, store.hash, scores_hash(scores),
                          cfg.batch_size * cfg.grad_accum * accelerator.num_processes * cfg.seq_len,
                          selection_hash(cfg.selection))
    keep = trainable_mask(store, cfg.train_on, cfg.selection, cfg.seq_len)
    tokenizer = store.tokenizer()
    model = _learner(cfg, store, tokenizer)
    reference = _reference(cfg, store, accelerator, model)
    if cfg.torch_compile:  # after the self reference is copied: a copy would share the compiled calls
        compile_layers(model)
    torch.manual_seed(cfg.seed)
    model, optimizer = accelerator.prepare(model, make_optimizer(model, cfg, accelerator.device.type == "cuda"))
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    chunked = cfg.loss_impl == "auto" and chunked_head_supported(accelerator) and linear_head_of(unwrapped, store, cfg.seq_len)
    # a self reference moves, so held-out reference losses (computed once) would depend on where a run resumed
    evaluator = Evaluator(cfg, accelerator, unwrapped if chunked else None,
                          reference if cfg.reference != "self" else None, resume_from is not None)
    run = Run(cfg, accelerator, store, scores, model, optimizer, WindowOrder(store.num_windows(cfg.seq_len), cfg.seed),
              reference, bool(chunked), evaluator,
              Checkpointer(out, accelerator, tokenizer, cfg.keep_last, stored_dtype(cfg.model)),
              MetricsLog(out, False, None), resume_from, held=held, next_eval=cfg.eval_every or math.inf,
              next_save=cfg.save_every or math.inf, parameters=sum(p.numel() for p in model.parameters()), keep=keep)
    if cfg.reference == "self":
        run.checkpointer.reference = reference[0]
    run.flops_per_token = flops_per_token(unwrapped, cfg.seq_len)
    run.head_backward = head_backward_flops(unwrapped) if chunked else 0.0
    run.peak = peak_flops(accelerator.device, cfg.precision, cfg.peak_flops)
    if resume_from is not None:
        run.checkpointer.resume(resume_from)
        run.step, run.tokens, run.next_eval, run.next_save = (state[k] for k in ("step", "tokens", "next_eval",
                                                                                  "next_save"))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        # the thread count in use, not None: numbers depend on it, and --threads N reproduces them
        written = {**asdict(cfg), "threads": torch.get_num_threads()}
        (out / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
        run.log = MetricsLog(out, True, run.step if resume_from is not None else None, accelerator)
        if accelerator.log_with:
            accelerator.init_trackers(out.name, config=tracker_config(written))
        if progress:
            print(start_line(run))
        if progress and resume_from is not None:
            print(f"train: resuming from {resume_from} (step {run.step}, {run.tokens:,} tokens)")
        elif progress and cfg.resume:
            print(f"train: no checkpoint in {out} to resume from; starting from the beginning")
    return run


def start_line(run: Run) -> str:
    """What the run will do, in its first line: steps and tokens (whole steps: a --max-tokens that is not a
    multiple of a step's tokens is rounded up), the model, the loss path, the threads."""
    cfg, total = run.cfg, run.total_steps * run.tokens_per_step
    rounded = f"; --max-tokens {cfg.max_tokens:,} rounded up to whole steps" if total != cfg.max_tokens else ""
    device = run.accelerator.device
    where = f"{torch.get_num_threads()} CPU threads (--threads reproduces them)" if device.type == "cpu" else str(device)
    weights = str(next(run.model.parameters()).dtype).removeprefix("torch.")
    mixed = f" with {cfg.precision} autocast" if cfg.precision != "no" else ""
    saved = str(run.checkpointer.dtype).removeprefix("torch.")
    dropout = dropout_of(run.accelerator.unwrap_model(run.model))
    line = (f"train {run.name}: {run.total_steps:,} steps of {run.tokens_per_step:,} tokens = {total:,} tokens"
            f"{rounded}; {run.parameters / 1e6:.2f}M parameters in {weights}{mixed}, saved in {saved}; loss from "
            f"{'the head input in chunks' if run.chunked_head else 'full logits'}; {where}")
    if cfg.train_on == "target":
        line += "\ntrain: the loss is on the target tokens only (--train-on target): no prompt token is trained on"
    if cfg.selection:
        line += f"\ntrain: on the tokens {cfg.selection} labelled (a static selection of `rho1 export`)"
    if cfg.reference == "self":
        how = (f"a moving average of its weights (decay {cfg.reference_ema:g})" if cfg.reference_ema is not None else
               f"a copy of it renewed every {cfg.reference_update} steps" if cfg.reference_update else
               "its starting weights")
        line += f"\ntrain: the reference is the learner itself, {how}; --score {cfg.score}"
    if dropout:
        line += (f"\ntrain: the model trains with dropout ({', '.join(f'{k} {v:g}' for k, v in dropout.items())}), so "
                 "its losses, and which tokens are selected, vary from step to step; set them to 0 in its config.json "
                 "for a deterministic selection")
    return line


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

    def add(self, result: StepResult, seconds: float = 0.0, flops: float = 0.0) -> None:
        self.steps, self.seconds, self.flops = self.steps + 1, self.seconds + seconds, self.flops + flops
        self.loss_sum, self.selected = self.loss_sum + result.loss_sum, self.selected + result.selected
        for stats in result.stats:
            for key, value in stats.items():
                self.values.setdefault(key, []).append(value)
        if result.grad_norm is not None:
            self.values.setdefault("grad_norm", []).append(result.grad_norm)
        if result.labels is not None:
            self.labels = result.labels if self.labels is None else self.labels + result.labels

    def record(self, run: Run, lr: float, tokens_per_second: float) -> dict:
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


def evaluate(run: Run) -> dict:
    if not run.evaluator.stores:
        return {}
    metrics = run.evaluator(run.model)
    run.log.write({"kind": "eval", "step": run.step, "tokens": run.tokens, **metrics})
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
    start, first_tokens = time.time(), run.tokens
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
            if result.skipped:
                skip_or_stop(run, result.skipped, progress)
            else:
                window.add(result, seconds, flops)
            run.step, run.tokens = step + 1, run.tokens + run.tokens_per_step
            if cfg.reference == "self":
                advance_reference(run.reference[0], acc.unwrap_model(run.model), run.step, cfg.reference_ema,
                                  cfg.reference_update)
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


def step_flops(run: Run, result: StepResult) -> float:
    """The model FLOPs one process did in a step: every token's forward and backward, less the head's backward
    of the tokens the chunked loss did not select."""
    tokens = run.tokens_per_step
    skipped_head = max(0.0, tokens - result.selected) * run.head_backward if not result.skipped else 0.0
    return (tokens * run.flops_per_token - skipped_head) / run.accelerator.num_processes


def finish(run: Run, last_eval: dict, seconds: float, first_tokens: int, progress: bool) -> dict:
    """summary.json and the closing line."""
    out = Path(run.cfg.out)
    per_process = (run.tokens - first_tokens) / run.accelerator.num_processes / max(run.train_seconds, 1e-9)
    utilisation, why_not = mfu(run.train_flops / max(run.train_seconds, 1e-9), run.peak) if run.train_seconds \
        else (None, "no optimizer step ran")
    summary = {"tokens": run.tokens, "steps": run.total_steps, "seconds": seconds,
               "tokens_per_second": (run.tokens - first_tokens) / seconds, "parameters": run.parameters,
               "processes": run.accelerator.num_processes, "tokens_per_second_per_process": per_process,
               "mfu": utilisation, "peak_flops": run.peak[0],
               "peak_flops_from": run.peak[1], "mfu_not_shown": why_not, "flops_per_token": run.flops_per_token,
               "attn_implementation": getattr(run.accelerator.unwrap_model(run.model).config, "_attn_implementation",
                                              None),
               "gradient_checkpointing": run.cfg.gradient_checkpointing, "torch_compile": run.cfg.torch_compile,
               **peak_memory_mib(run.accelerator.device),
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
