"""Where a model or tokenizer named on the command line comes from: a local folder, a .gguf file, or a Hugging
Face hub name. Every way of getting it wrong is one sentence before anything loads (a run folder, a TokenStore,
a path that does not exist, a hub name without a network), instead of a long traceback after a timeout."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def _hub_name(name: str) -> bool:
    """``name`` is a valid hub repository id (``org/model`` or ``model``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~", "/")) or name.count("/") > 1 or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; let the download say
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json"))


def is_gguf(name_or_path) -> bool:
    """A path to a GGUF file (llama.cpp's format), which transformers loads dequantised with its tokenizer."""
    return str(name_or_path).lower().endswith(".gguf")


def check_gguf_installed(name: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(f"{name} is a GGUF file, which transformers reads with the gguf package; install it "
                         "(pip install 'rho1[gguf]', or pip install gguf)") from None


def locate(name_or_path: str, what: str = "model") -> str:
    """``name_or_path`` ready for ``from_pretrained``, or a ValueError naming the problem and the fix."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{what} {name} is a symbolic link that leads nowhere (a loop, or its target is gone); pass "
                         "the folder itself")
    if path.exists():
        if path.is_file() and is_gguf(path):
            check_gguf_installed(name)
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{what} {name} is not a GGUF file (it does not begin with GGUF's magic bytes); "
                                     "pass a .gguf file written by llama.cpp's tools, or a model folder")
            return str(path)
        if not path.is_dir():
            raise ValueError(f"{what} {name} is a file; pass the folder that holds config.json (a checkpoint folder "
                             "such as RUN/final), a .gguf file or a hub name")
        manifest = path / "manifest.json"
        if manifest.is_file():
            try:
                kind = {"rho1.token_store/1": "TokenStore", "rho1.score_store/1": "ScoreStore"}.get(
                    json.loads(manifest.read_text()).get("format"), "")
            except (ValueError, OSError):
                kind = ""
            if kind:
                raise ValueError(f"{name} is a {kind}, not a {what}; pass a checkpoint folder such as RUN/final")
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file() and \
                not (path / "adapter_config.json").is_file():
            if (path / "final" / "config.json").is_file() or (path / "metrics.jsonl").is_file():
                raise ValueError(f"{name} is a run folder; its {what} is {path / 'final'}")
            raise ValueError(f"{name} holds no Hugging Face {what} (no config.json); pass a folder written by "
                             "save_pretrained, such as RUN/final")
        return str(path)
    if not _hub_name(name) or is_gguf(path):
        raise ValueError(f"{what} {name} does not exist; pass a folder written by save_pretrained (such as "
                         "runs/reference/final) or a hub name such as TinyLlama/TinyLlama_v1.1")
    if _cached(name):
        return name
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise ValueError(f"{what} {name} is not a local folder and is not in the Hugging Face cache, and HF_HUB_OFFLINE "
                         "is set; download it first (`hf download NAME`) or pass a local folder")
    if not _hub_reachable():
        raise ValueError(f"{what} {name} is not a local folder and the Hugging Face hub cannot be reached (no "
                         "network?); pass a local folder, or download it first on a machine with a network")
    return name
