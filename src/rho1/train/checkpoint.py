"""A run's checkpoints: the layout, saving (atomic, pruned to --keep-last), resuming (hashes checked).

    RUN/checkpoints/<tokens>/   a Hugging Face folder (safetensors + tokenizer), state/ (accelerate:
                                optimizer, RNG, scaler) and rho1_state.json (position, weight hashes)
    RUN/final/                  the last weights, a Hugging Face folder

A checkpoint is written beside its final name (``<tokens>.partial``) and renamed into place, so a kill
or a full disk leaves the previous one intact.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from rho1.data.store import check_writable, read_json, sha256_file, verify_files
from rho1.model import save_checkpoint
from rho1.self_reference import REFERENCE_FILE  # the weights of a --reference self, which move with the run

STATE_FILE = "rho1_state.json"


def checkpoints(out: Path) -> list[Path]:
    """Complete resumable checkpoints of a run, oldest first."""
    root = Path(out) / "checkpoints"
    found = [p for p in root.iterdir() if p.name.isdigit() and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def read_training_state(path: Path) -> dict:
    """Our position in a checkpoint, after checking its weights against the hashes written with it."""
    state = read_json(path / STATE_FILE, f"delete {path} to resume from the checkpoint before it")
    verify_files(path, state, "checkpoint", f"delete {path} to resume from the checkpoint before it")
    return state


def check_run_folder(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start), after refusing an --out that would mix two runs."""
    check_writable(out)
    if resume:
        latest = latest_checkpoint(out)
        if latest is None and (out / "final").exists():  # starting over would replace a finished run's model
            raise ValueError(f"{out} holds a finished run with no resumable checkpoint (it was trained without "
                             "--save-every), so there is nothing to resume; start a new run in another --out (with "
                             f"--model {out / 'final'} to continue training its model)")
        return latest
    if (out / "final").exists() or checkpoints(out):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it, or another --out "
                         "(or delete it) to start over")
    if out.is_dir() and not (out / "config.yaml").is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder that holds other files; choose a new or empty folder")
    return None


# options a resumed run may change: they decide how a run is watched and kept, not what it computes
CHANGEABLE_ON_RESUME = ("threads", "log_every", "eval_every", "eval_max_windows", "save_every", "keep_last", "resume",
                        "skip_nonfinite", "out", "gradient_checkpointing", "torch_compile", "attn_implementation",
                        "report_to", "peak_flops")
PATH_OPTIONS = ("data", "scores", "reference", "model", "eval_data", "eval_scores", "selection")


def _as_written(name: str, value):
    """A value as compared on resume: paths that exist resolved (``stores/web`` and ``./stores/web/`` agree)."""
    def one(v):
        return str(Path(v).resolve()) if isinstance(v, str) and v and Path(v).exists() else v

    if name in PATH_OPTIONS:
        return [one(v) for v in value] if isinstance(value, list) else one(value)
    return value


def check_same_recipe(out: Path, cfg, state: dict, store_hash: str, scores_hash: str | None,
                      tokens_per_step: int | None = None, selection_hash: str | None = None) -> None:
    """A resumed run must be the run that was started: every option that changes what it computes (and the
    data, by content) as written in RUN/config.yaml and the checkpoint, or one sentence naming each change."""
    import yaml

    path = out / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        raise ValueError(f"{path} is not valid YAML (edited by hand?); restore it to resume the run") from None
    changes = []
    unused = {"temperature": cfg.rule != "soft", "threshold": cfg.rule != "threshold"}  # options of other rules
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    for name, value in vars(cfg).items():
        # an option newer than the run's config.yaml was at its default when the run started
        if not isinstance(old, dict) or name in CHANGEABLE_ON_RESUME or unused.get(name) or (
                name not in old and name not in defaults):
            continue
        before, now = _as_written(name, old.get(name, defaults.get(name))), _as_written(name, value)
        if before != now:
            changes.append(f"--{name.replace('_', '-')} {old.get(name, defaults.get(name))!r} -> {value!r}")
    if state.get("token_store_hash") not in (None, store_hash):
        changes.append(f"the TokenStore's content (hash {state['token_store_hash']} -> {store_hash}: rebuilt since)")
    if state.get("tokens_per_step") not in (None, tokens_per_step):
        changes.append(f"the tokens per step ({state['tokens_per_step']:,} -> {tokens_per_step:,}: another number of "
                       "processes; resume with the process count the run started with)")
    if state.get("scores_hash") not in (None, scores_hash):
        changes.append("the ScoreStore's content (rescored since)")
    if state.get("selection_hash") not in (None, selection_hash):
        changes.append("the export of --selection (exported again since)")
    if not changes:
        return
    how = ("; a run's length cannot change in place (the learning-rate schedule is set by --max-tokens): to train "
           f"further, start a new run with --model {out / 'final'}" if any("--max-tokens" in c for c in changes)
           else "")
    raise ValueError(f"--resume would continue {out} with another recipe: {'; '.join(changes)}; rerun with the "
                     f"options it started with ({path}), or start a new run in another --out{how}")


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


def drop_tied_duplicates(models, weights, output_dir) -> None:
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


class Checkpointer:
    """Saves and restores one run's checkpoints with accelerate (every process calls every method)."""

    def __init__(self, out: Path, accelerator, tokenizer, keep_last: int, dtype=None, lora: bool = False):
        """``dtype``: the dtype the Hugging Face folders are written in (the one the model came in). ``lora``: the
        model trains adapters (--use-peft): checkpoints hold them, not the frozen base."""
        self.out, self.accelerator, self.tokenizer, self.keep_last = Path(out), accelerator, tokenizer, keep_last
        self.dtype, self.lora = dtype, lora
        self.reference = None  # a --reference self model, saved and restored with the learner
        accelerator.register_save_state_pre_hook(drop_tied_duplicates)
        if self.lora:
            from rho1.lora import adapter_weights_only

            accelerator.register_save_state_pre_hook(adapter_weights_only)

    def resume(self, path: Path) -> None:
        """The optimizer, RNG and scaler of a checkpoint (its weights checked by ``read_training_state``); under LoRA
        its adapters, the base coming from --model."""
        self.accelerator.load_state(str(path / "state"), **({"strict": False} if self.lora else {}))
        if self.reference is not None:
            from safetensors.torch import load_model

            if not (path / REFERENCE_FILE).is_file():
                raise ValueError(f"{path} has no {REFERENCE_FILE}: it was saved by a run without --reference self; "
                                 "resume with the options the run started with")
            load_model(self.reference, path / REFERENCE_FILE, device=str(self.accelerator.device))

    def save_final(self, model, info: dict) -> None:
        """RUN/final, a plain Hugging Face folder; under LoRA the adapter merged in, and RUN/adapter the adapter alone
        (a PEFT folder on the recorded base)."""
        self.accelerator.wait_for_everyone()
        if self.lora:
            if self.accelerator.is_main_process:
                from rho1.lora import merged, save_adapter

                learner = self.accelerator.unwrap_model(model)
                save_adapter(learner, self.out / "adapter")
                self.tokenizer.save_pretrained(self.out / "adapter")
                save_checkpoint(merged(learner), self.tokenizer, self.out / "final", info, dtype=self.dtype)
            self.accelerator.wait_for_everyone()
            return
        state_dict = self.accelerator.get_state_dict(model)  # a collective under FSDP/DeepSpeed
        if self.accelerator.is_main_process:
            save_checkpoint(self.accelerator.unwrap_model(model), self.tokenizer, self.out / "final", info, state_dict,
                            self.dtype)

    def save(self, model, position: dict) -> None:
        """A resumable checkpoint at ``position["tokens"]``, then the oldest beyond --keep-last go."""
        acc = self.accelerator
        path = self.out / "checkpoints" / str(position["tokens"])
        tmp = path.with_name(path.name + ".partial")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp / "state"))
            state_dict = None if self.lora else acc.get_state_dict(model)
            if acc.is_main_process and self.lora:  # the adapters only: the frozen base is --model's
                acc.unwrap_model(model).save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            elif acc.is_main_process:
                save_checkpoint(acc.unwrap_model(model), self.tokenizer, tmp, state_dict=state_dict, dtype=self.dtype)
            if acc.is_main_process:
                if self.reference is not None:
                    from safetensors.torch import save_model

                    save_model(self.reference, str(tmp / REFERENCE_FILE))
                files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
                (tmp / STATE_FILE).write_text(json.dumps({**position, "sha256": files}, indent=2))
        except (OSError, RuntimeError, SafetensorError) as err:  # torch and safetensors wrap I/O errors
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise checkpoint_error(path, err, latest_checkpoint(self.out)) from err
        if acc.is_main_process:
            os.replace(tmp, path)
            for old in checkpoints(self.out)[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
