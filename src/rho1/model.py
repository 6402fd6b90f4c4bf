"""Models: tiny Llama presets for CPU, and loading/saving any Hugging Face causal LM (safetensors only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rho1.config import MODEL_PRESETS


def build_model(preset: str, vocab_size: int, max_positions: int, eos_token_id: int, pad_token_id: int | None = None,
                seed: int = 0, attn_implementation: str | None = None) -> LlamaForCausalLM:
    """A freshly initialised Llama of a preset size with tied embeddings (``attn_implementation``: sdpa,
    eager or flash_attention_2; None: transformers' default, sdpa)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rms_norm_eps=1e-5,
        **MODEL_PRESETS[preset],
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_model(name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
               attn_implementation: str | None = None, load_in_4bit: bool = False):
    """Any Hugging Face causal LM by local path or hub name, from safetensors weights only (``attn_implementation``:
    None for transformers' default, sdpa where the model supports it); a .gguf file; a PEFT adapter folder (its
    base loaded as recorded, the adapter merged in). ``load_in_4bit``: the weights quantized by bitsandbytes."""
    from rho1.lora import is_adapter_folder
    from rho1.pretrained import is_gguf, locate

    name = locate(name_or_path, "model")
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    adapter = is_adapter_folder(name) and not (Path(name) / "config.json").is_file()
    if load_in_4bit and adapter:
        raise ValueError(f"{name_or_path} is a LoRA adapter folder, which rho1 merges into its base at full "
                         "precision; drop --load-in-4bit, or pass the merged RUN/final folder")
    if load_in_4bit:
        attention["quantization_config"] = four_bit(name, dtype)
    if is_gguf(name):
        return load_gguf(Path(name), dtype or torch.float32, attention)
    if adapter:
        return load_merged_adapter(Path(name), trust_remote_code, dtype, attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32, **attention
        )
    except OSError as err:
        if "safetensors" in str(err).lower():
            raise ValueError(
                f"model {name_or_path} has no safetensors weights; rho1 never loads pickled checkpoints, "
                "convert it with save_pretrained(..., safe_serialization=True)"
            ) from None
        raise ValueError(f"could not load model {name_or_path}: {' '.join(str(err).split())[:300]}") from err
    except ValueError as err:  # e.g. "Unrecognized model", a config of another kind of model
        raise ValueError(f"could not load model {name_or_path} as a causal LM: {' '.join(str(err).split())[:300]}") \
            from err
    return model


def four_bit(name: str, dtype: torch.dtype | None):
    """bitsandbytes' 4-bit NF4 quantization of a base (QLoRA), or one sentence where it cannot run."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError("--load-in-4bit quantizes the base with bitsandbytes, which runs on a CUDA GPU, and this "
                         "machine has none; drop --load-in-4bit (LoRA trains on the base as it is)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    if str(name).lower().endswith(".gguf"):
        raise ValueError(f"--load-in-4bit quantizes a model folder or hub name, and {name} is a GGUF file; pass the "
                         "model's folder, or drop --load-in-4bit")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or torch.bfloat16)


def load_merged_adapter(folder: Path, trust_remote_code: bool, dtype, attn_implementation):
    """A PEFT adapter folder as a plain model: its base (a folder, hub name or .gguf, as adapter_config.json
    records it) with the adapter merged in."""
    from rho1.lora import adapter_base, check_peft_installed

    check_peft_installed()
    base = adapter_base(folder)
    if not base:
        raise ValueError(f"adapter {folder} records no base model (base_model_name_or_path in adapter_config.json), as "
                         "when it was trained on a fresh --model-preset that was never saved; pass the run's merged "
                         "final folder, or set it to the model the adapter was trained on")
    model = load_model(base, trust_remote_code, dtype, attn_implementation)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder).merge_and_unload()


def load_gguf(path: Path, dtype: torch.dtype, attention: dict):
    """A causal LM from a GGUF file through transformers' own reader, dequantised to ``dtype``. Its weights are
    then plain tensors, but transformers still marks the model as GGUF-quantised, so that ``Trainer`` refuses to
    train it and ``save_pretrained`` writes the mark into config.json: the mark goes, and the model is what a
    folder of the same weights would load as."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **attention)
    except (ValueError, NotImplementedError, KeyError) as err:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        raise ValueError(f"transformers cannot load {path} ({' '.join(str(err).split())[:200]}); it reads GGUF files "
                         f"of {', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'}))}: convert the model to a folder with "
                         "save_pretrained elsewhere and pass that folder") from None
    except OSError as err:
        raise ValueError(f"could not read GGUF file {path}: {' '.join(str(err).split())[:300]}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # what transformers' own dequantize() does
    model.config._is_quantized = False
    return model


# what configs call the longest input their positions allow (GPT-2: n_positions, MPT: max_seq_len, ...)
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length",
                   "n_ctx")


def position_limit(model) -> int | None:
    """The most tokens a model's positions take, or None when they set no limit (ALiBi, as Bloom; a
    recurrent state-space model, as Mamba)."""
    config = getattr(model, "config", model)
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(model, seq_len: int, model_name: str, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's positions (one sentence, before any forward)."""
    limit = position_limit(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{flag} {seq_len} is longer than model {model_name} takes ({limit} positions); pass a "
                         f"{flag} of at most {limit}")


def stored_dtype(name_or_path: str | None) -> torch.dtype:
    """The dtype a model's weights were saved in (its config.json says), which its run's checkpoints keep;
    float32 for a fresh model or when the config does not say."""
    if not name_or_path or str(name_or_path).lower().endswith(".gguf"):  # a GGUF model is dequantised to float32
        return torch.float32
    path = Path(name_or_path) / "config.json"
    try:
        if path.is_file():
            config = json.loads(path.read_text())
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name_or_path).to_dict()
    except (OSError, ValueError):
        return torch.float32
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def dropout_of(model) -> dict[str, float]:
    """The dropout probabilities a model's config turns on (OPT: 0.1), by name; {} when none."""
    config = getattr(model, "config", model)
    found = {}
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and not name.startswith(("classifier", "summary")) and \
                isinstance(value, float) and value > 0:
            found[name] = value
    return found


def model_hash(name_or_path: str, model=None) -> str:
    """Fingerprint of a model: for a local file or folder its config and, of each weight file, the name, size and
    modification time (as a store is trusted: hashing half a gigabyte of weights cost more than a second of every
    `rho1 score`; a weight file edited or copied gets another fingerprint), else the hub commit."""
    path = Path(name_or_path)
    h = hashlib.sha256()
    if path.is_file():  # a .gguf file
        h.update(f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns}".encode())
    elif path.is_dir():  # (an adapter folder: its weights and config, which names the base)
        for f in sorted(path.glob("*.safetensors")) + [path / "config.json", path / "adapter_config.json"]:
            if f.is_file():
                h.update(f.name.encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
                else:
                    h.update(f" {f.stat().st_size} {f.stat().st_mtime_ns}".encode())
    else:
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        h.update(f"{name_or_path}@{commit}".encode())
    return h.hexdigest()[:16]


def check_model_fits(model, store, model_name: str, cross_tokenizer_hint: bool = False) -> None:
    """Refuse a model whose vocabulary or tokenizer does not belong to the store's tokenizer."""
    hint = (", or pass --cross-tokenizer to project this reference's losses onto the store's tokens"
            if cross_tokenizer_hint else "")
    n_embed = model.get_input_embeddings().num_embeddings
    if n_embed < store.vocab_size:
        raise ValueError(
            f"model {model_name} has {n_embed} token embeddings but TokenStore {store.path} uses a tokenizer with "
            f"{store.vocab_size} tokens; prepare the store with the model's tokenizer (--tokenizer {model_name})"
            + hint
        )
    tok_dir = Path(model_name).expanduser()
    if same_tokenizer_files(tok_dir, store.path / "tokenizer"):
        return
    if tok_dir.is_file() or (tok_dir / "tokenizer_config.json").is_file() or (tok_dir / "tokenizer.json").is_file():
        from rho1.data.tokenizer import load_tokenizer, tokenizer_hash

        if tokenizer_hash(load_tokenizer(tok_dir)) != store.tokenizer_hash:
            raise ValueError(
                f"model {model_name} comes with another tokenizer than TokenStore {store.path}; "
                f"prepare the store with `rho1 prepare --tokenizer {model_name}`" + hint
            )
    elif not tok_dir.exists():  # a hub name: its tokenizer, when it can be had, must number tokens as the store does
        from rho1.data.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(model_name)
        except Exception:  # noqa: BLE001 - offline, custom code, a missing extra: nothing to compare with
            return
        if len(tokenizer) != store.vocab_size or tokenizer.eos_token_id != store.manifest["eos_token_id"]:
            raise ValueError(
                f"model {model_name} comes with another tokenizer than TokenStore {store.path} ({len(tokenizer)} "
                f"tokens vs {store.vocab_size}); prepare the store with `rho1 prepare --tokenizer {model_name}`" + hint
            )


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """True when two folders hold byte-identical tokenizer files (what `rho1 prepare --tokenizer` saves): the same
    tokenizer without loading and hashing either (half a second at a 49k vocabulary)."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    if not (a.is_dir() and (a / names[0]).is_file() and (b / names[0]).is_file()):
        return False
    return all((a / n).is_file() == (b / n).is_file() and (not (a / n).is_file() or
                                                          (a / n).read_bytes() == (b / n).read_bytes()) for n in names)


def save_checkpoint(model, tokenizer, path: Path, extra: dict | None = None, state_dict: dict | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """A Hugging Face checkpoint (safetensors + tokenizer) that from_pretrained and lm-eval read as is.

    Under FSDP or DeepSpeed pass ``state_dict=accelerator.get_state_dict(model)`` (gathered on every process).
    ``dtype``: the dtype written (the one the model came in), whatever the dtype it was trained in."""
    path.mkdir(parents=True, exist_ok=True)
    trained_in = getattr(model.config, "dtype", None)
    cast = dtype is not None and dtype != next(model.parameters()).dtype
    if cast:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    if state_dict is not None:  # a gathered state dict holds tied weights twice: drop the head's copy (loading
        head = model.get_output_embeddings()  # ties it back to the input embedding), as save_pretrained does
        tied = head is not None and head.weight is getattr(model.get_input_embeddings(), "weight", None)
        names = [n for n, m in model.named_modules() if m is head] if tied else []
        state_dict = {k: v for k, v in state_dict.items() if not any(k == f"{n}.weight" for n in names)}
    try:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    finally:
        model.config.dtype = trained_in  # save_pretrained writes the dtype of the weights in memory
    if cast:
        config = json.loads((path / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    if extra:
        (path / "rho1_state.json").write_text(json.dumps(extra, indent=2))
