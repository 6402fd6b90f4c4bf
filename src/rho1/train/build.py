"""``setup``: check everything, then build what a `rho1 train` run needs (data, model, reference, optimizer,
evaluator, checkpoints, the resumed position), holding the lock of --out; and the run's first line."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from rho1.accel import compute_dtype, hold_job_lock, make_accelerator
from rho1.allocator import keep_freed_memory
from rho1.compute import flops_per_token, head_backward_flops, peak_flops
from rho1.config import TrainConfig
from rho1.config.train import default_schedule
from rho1.data.loader import WindowOrder, trainable_mask
from rho1.data.store import TokenStore, check_writable, open_with_scores
from rho1.head import chunked_head_supported, linear_head_of
from rho1.lock import check_not_inside
from rho1.lora import add_lora, check_lora_launch, check_peft_installed, is_adapter_folder
from rho1.model import build_model, check_model_fits, check_positions, dropout_of, load_model, stored_dtype
from rho1.threads import set_threads
from rho1.train.checkpoint import Checkpointer, check_run_folder, check_same_recipe, read_training_state
from rho1.train.evaluator import Evaluator
from rho1.train.metrics import MetricsLog
from rho1.train.reference import loop_reference
from rho1.train.run import Run, scores_hash, selection_hash
from rho1.train.trackers import tracker_config, trackers


def make_optimizer(model, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only; ``fused`` (on CUDA) updates every parameter in one kernel."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))


def _learner(cfg: TrainConfig, store: TokenStore, tokenizer):
    """The model trained: loaded (float32 master weights; under --use-peft a frozen base in the compute dtype, or in
    4 bits) or built fresh, with LoRA adapters under --use-peft."""
    check_attention(cfg.attn_implementation)
    if cfg.use_peft:
        check_peft_installed()
    if cfg.model:
        dtype = compute_dtype(cfg.precision) if cfg.use_peft else None  # a frozen base needs no float32 master
        model = load_model(cfg.model, cfg.trust_remote_code, dtype=dtype, attn_implementation=cfg.attn_implementation,
                           load_in_4bit=cfg.load_in_4bit)
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
    if cfg.use_peft:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, lora_base(cfg),
                         cfg.seed)
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


def setup(cfg: TrainConfig, progress: bool = True) -> Run:
    """Check everything, then build the run: data, models, optimizer, evaluator, resumed position. The run
    holds the lock of --out until ``fit`` ends."""
    cfg.check()
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    keep_freed_memory()
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
    if cfg.use_peft:
        check_lora_launch(accelerator.distributed_type)
    resume_from = check_run_folder(out, cfg.resume)
    cfg.resolve_warmup(accelerator.num_processes)
    store, scores = open_with_scores(cfg.data, cfg.scores, cfg.seq_len)
    state = read_training_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_same_recipe(out, cfg, state, store.hash, scores_hash(scores),
                          cfg.batch_size * cfg.grad_accum * accelerator.num_processes * cfg.seq_len,
                          selection_hash(cfg.selection))
    keep = trainable_mask(store, cfg.train_on, cfg.selection, cfg.seq_len)
    tokenizer = store.tokenizer()
    model = _learner(cfg, store, tokenizer)
    reference = loop_reference(cfg, store, accelerator, model)
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
              Checkpointer(out, accelerator, tokenizer, cfg.keep_last, stored_dtype(cfg.model), cfg.use_peft),
              MetricsLog(out, False, None), resume_from, held=held, next_eval=cfg.eval_every or math.inf,
              next_save=cfg.save_every or math.inf, parameters=sum(p.numel() for p in model.parameters()), keep=keep)
    if cfg.reference == "self" and not cfg.use_peft:  # (under LoRA the reference is an adapter of the model)
        run.checkpointer.reference = reference[0]
    run.flops_per_token = flops_per_token(unwrapped, cfg.seq_len)
    run.head_backward = head_backward_flops(unwrapped) if chunked else 0.0
    run.peak = peak_flops(accelerator.device, cfg.precision, cfg.peak_flops)
    if resume_from is not None:
        run.checkpointer.resume(resume_from)
        run.step, run.tokens, run.next_eval, run.next_save = (state[k] for k in ("step", "tokens", "next_eval",
                                                                                  "next_save"))
        run.flops = state.get("flops", run.tokens * run.flops_per_token)  # (a checkpoint older than the count)
    if accelerator.is_main_process:
        _open_run_folder(run, progress)
    return run


def lora_base(cfg: TrainConfig) -> str | None:
    """The base an adapter of this run records: --model, a local path resolved (so it loads from anywhere)."""
    if not cfg.model:
        return None
    return str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model


def _open_run_folder(run: Run, progress: bool) -> None:
    """config.yaml, metrics.jsonl and the trackers (main process), and the run's first lines."""
    cfg, out, resume_from = run.cfg, Path(run.cfg.out), run.resumed_from
    out.mkdir(parents=True, exist_ok=True)
    # the thread count in use, not None: numbers depend on it, and --threads N reproduces them
    written = {**asdict(cfg), "threads": torch.get_num_threads()}
    (out / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    run.log = MetricsLog(out, True, run.step if resume_from is not None else None, run.accelerator)
    if run.accelerator.log_with:
        run.accelerator.init_trackers(out.name, config=tracker_config(written))
    if not progress:
        return
    print(start_line(run))
    if resume_from is not None:
        print(f"train: resuming from {resume_from} (step {run.step}, {run.tokens:,} tokens)")
    elif cfg.resume:
        print(f"train: no checkpoint in {out} to resume from; starting from the beginning")


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
    lr, warmup, why = default_schedule(cfg, run.accelerator.num_processes)
    taken = [f for f, same in ((f"--lr {cfg.lr:g}", cfg.lr == lr), (f"--warmup-steps {cfg.warmup_steps}",
                                                                     cfg.warmup_steps == warmup)) if same]
    if taken and cfg.model:
        line += f"\ntrain: {' and '.join(taken)}: the defaults for {why} (--lr / --warmup-steps choose others)"
    if cfg.use_peft:
        trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        line += (f"\ntrain: LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {' '.join(cfg.lora_target_modules)}: "
                 f"{trained / 1e6:.2f}M of {run.parameters / 1e6:.2f}M parameters train"
                 + (", the base held in 4 bits" if cfg.load_in_4bit else ""))
    if cfg.reference and cfg.reference != "self" and not cfg.use_peft and is_adapter_folder(cfg.reference):
        line += (f"\ntrain: --reference {cfg.reference} is a PEFT adapter, merged into its own copy of its base (a second "
                 "whole model); with --use-peft on the same base it would ride on the learner's weights")
    if cfg.train_on == "target":
        line += "\ntrain: the loss is on the target tokens only (--train-on target): no prompt token is trained on"
    if cfg.selection:
        line += f"\ntrain: on the tokens {cfg.selection} labelled (a static selection of `rho1 export`)"
    if cfg.reference == "self":
        how = (f"a moving average of its weights (decay {cfg.reference_ema:g})" if cfg.reference_ema is not None else
               f"a copy of it renewed every {cfg.reference_update} steps" if cfg.reference_update else
               "its starting weights")
        lora = "" if not cfg.use_peft else " (its base, the adapters off)" if how == "its starting weights" else \
            " (a second adapter on the same base, float32)"
        line += f"\ntrain: the reference is the learner itself, {how}{lora}; --score {cfg.score}"
    if dropout:
        line += (f"\ntrain: the model trains with dropout ({', '.join(f'{k} {v:g}' for k, v in dropout.items())}), so "
                 "its losses, and which tokens are selected, vary from step to step; set them to 0 in its config.json "
                 "for a deterministic selection")
    return line
