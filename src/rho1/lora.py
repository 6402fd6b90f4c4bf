"""LoRA through PEFT, and the reference that rides on the learner's base (the `rho1[peft]` extra).

With adapters the reference needs no second copy of the frozen weights:

    --reference self                  the learner with its adapters switched off: its base (LoRA starts at zero)
    --reference-ema / --reference-update   a second adapter, "reference", on the same base: the float32 moving
                                      average of the learner's adapter, or a copy of it every N steps
    --reference ADAPTER_FOLDER        a PEFT adapter trained on the same base, loaded as the second adapter

``AdapterView`` is that reference: it runs the learner's own PeftModel with the reference's adapter (or none)
for one forward, in eval mode and without a gradient, and leaves the learner as it was. The reference then
costs the adapter's megabytes, not a model.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

REFERENCE = "reference"  # the second adapter's name
ADAPTER_CONFIG = "adapter_config.json"


def check_peft_installed() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("--use-peft trains LoRA adapters with PEFT, which is not installed; pip install "
                         "'rho1[peft]' (or pip install peft)") from None


def check_lora_launch(distributed_type) -> None:
    """LoRA runs on one process or under DDP: the adapter references switch adapters on a model that FSDP or
    DeepSpeed would have wrapped and sharded."""
    if distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(f"--use-peft runs on one process or under DDP, not under {distributed_type.value}; launch "
                         "with configs/accelerate/ddp.yaml")


def is_adapter_folder(path) -> bool:
    """A folder written by PEFT's save_pretrained: adapter_config.json and the adapter's weights."""
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> str | None:
    """The base model a PEFT adapter folder was trained on, as its adapter_config.json records it."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def same_base(recorded: str | None, base: str | None) -> bool:
    """Two names of one base: equal paths (resolved) or equal names."""
    if not recorded or not base:
        return False
    a, b = Path(recorded).expanduser(), Path(base).expanduser()
    return a.resolve() == b.resolve() if a.exists() and b.exists() else recorded == base


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str], base: str | None = None,
             seed: int = 0):
    """``model`` with a trainable LoRA adapter ("default") on its linear layers; every other weight frozen, the
    adapter's random half drawn from ``seed`` (so every process, and every run of one seed, starts alike). ``base``:
    the name the adapter records as its base (PeftModel.from_pretrained and rho1 load it from there)."""
    check_peft_installed()
    from peft import LoraConfig, get_peft_model

    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise ValueError(f"--lora-target-modules {' '.join(target_modules)}: {' '.join(str(err).split())[:200]}; "
                         "name modules the model has (e.g. q_proj v_proj), or all-linear") from None
    if base:
        model.peft_config["default"].base_model_name_or_path = base
    return model


def reference_adapter(model, how: str, folder: str | None = None) -> None:
    """The second adapter of ``model`` (a PeftModel): ``copy`` of the learner's adapter (a moving average or a
    self-evolving copy starts there, held in float32), or ``load`` of a PEFT adapter folder; never trained."""
    if how == "load":
        model.load_adapter(folder, adapter_name=REFERENCE, is_trainable=False)
    else:
        model.add_adapter(REFERENCE, copy.deepcopy(model.peft_config["default"]))
        with torch.no_grad():
            for ref, own in adapter_pairs(model):
                ref.data = own.detach().float().clone()
    model.set_adapter("default")  # the learner's adapter trains (requires grad), the reference's does not


def adapter_pairs(model):
    """(reference adapter tensor, learner adapter tensor) of every LoRA weight, matched by name."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{REFERENCE}." in f".{name}.":
            yield param, params[name.replace(f".{REFERENCE}.", ".default.")]


@torch.no_grad()
def advance_adapter_reference(model, step: int, ema: float | None, every: int) -> None:
    """The reference adapter after optimizer step ``step``: a float32 step of its moving average towards the
    learner's adapter, or every ``every`` steps a copy of it (as rho1.self_reference does with whole models)."""
    if ema is None and not (every and step % every == 0):
        return
    for ref, own in adapter_pairs(model):
        if ema is not None:
            ref.lerp_(own.detach().to(ref.dtype), 1.0 - ema)
        else:
            ref.copy_(own.detach())


class AdapterView:
    """The learner's own PeftModel as a frozen reference: ``adapter`` None runs its base (adapters off), else the
    named adapter. One forward at a time, in eval mode (no dropout), the learner left as it was. Calls that
    would freeze, move or switch the mode of a reference model are no-ops here: the weights are the learner's."""

    cross_tokenizer = False

    def __init__(self, model, adapter: str | None):
        self.model, self.adapter = model, adapter

    @contextlib.contextmanager
    def active(self):
        model = self.model
        flags = [(p, p.requires_grad) for p in model.parameters()]  # set_adapter and disable_adapter change them
        was_training, previous = model.training, model.active_adapter
        model.eval()
        try:
            if self.adapter is None:
                with model.disable_adapter():
                    yield
            else:
                model.set_adapter(self.adapter)
                try:
                    yield
                finally:
                    model.set_adapter(previous)
        finally:
            model.train(was_training)
            for param, flag in flags:
                param.requires_grad_(flag)

    def __call__(self, *args, **kwargs):
        with self.active():
            return self.model(*args, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def training(self) -> bool:
        return False

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def parameters(self):
        return self.model.parameters()

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def requires_grad_(self, flag: bool = True):
        return self


def adapter_weights_only(models, weights, output_dir) -> None:
    """accelerate's save_state pre-hook under LoRA: a checkpoint keeps the adapters (the learner's and a moving
    reference's), not the frozen base, which the run loads again from --model."""
    for state in weights:
        for name in [n for n in state if "lora_" not in n]:
            del state[name]


def save_adapter(model, folder: Path) -> None:
    """The learner's adapter as a PEFT folder (PeftModel.from_pretrained loads it on the base it records)."""
    model.save_pretrained(folder, selected_adapters=["default"])


def merged(model):
    """The learner's adapter merged into its base, as a plain transformers model (the PeftModel is spent)."""
    return model.merge_and_unload(adapter_names=["default"])
