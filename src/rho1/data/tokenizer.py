"""Tokenizers: any Hugging Face tokenizer, or a byte-level BPE trained on the corpus itself."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with digits split one by one (so arithmetic is learnable), EOS and PAD tokens."""
    if vocab_size < 300:
        raise ValueError(f"--train-tokenizer needs a vocabulary of at least 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """A Hugging Face tokenizer by local path or hub name; it must have an EOS token to separate documents."""
    from rho1.pretrained import is_gguf, locate

    name = locate(str(name_or_path), "tokenizer")
    adapter = Path(name) / "adapter_config.json"
    if adapter.is_file() and not (Path(name) / "tokenizer_config.json").is_file():  # a PEFT adapter: its base's
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            return load_tokenizer(base, trust_remote_code)
    try:
        if is_gguf(name):  # the vocabulary, merges and chat template a GGUF file carries
            tok = AutoTokenizer.from_pretrained(str(Path(name).parent), gguf_file=Path(name).name)
        elif _saved_as_plain_fast(Path(name)):
            # AutoTokenizer would pick the class of the model type in config.json (Qwen2Tokenizer for a qwen2
            # folder), which rebuilds the pre-tokenizer and normalizer: what loads must be what was saved
            tok = PreTrainedTokenizerFast.from_pretrained(name)
        else:
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ValueError(f"could not load tokenizer {name_or_path}: {' '.join(str(err).split())[:300]}") from err
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no EOS token; documents need one to be separated")
    return tok


def _saved_as_plain_fast(folder: Path) -> bool:
    """A local folder whose tokenizer was saved as a plain ``tokenizers`` tokenizer (rho1's own BPE, or any
    ``PreTrainedTokenizerFast``), with its tokenizer.json beside it."""
    config = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        saved = json.loads(config.read_text()).get("tokenizer_class")
    except (ValueError, OSError, AttributeError):
        return False
    return saved in ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenizer_hash(tokenizer) -> str:
    """A stable fingerprint of a tokenizer's vocabulary and rules (same hash = same token ids)."""
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        payload = json.dumps(spec, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    payload += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
