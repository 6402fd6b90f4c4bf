"""`rho1 score`: a reference model's per-token loss over a TokenStore -> ScoreStore (computed once, offline)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from rho1.data.store import SCORE_FORMAT, ScoreStore, TokenStore, replace_dir, write_json_atomic
from rho1.evaluate import token_losses
from rho1.model import check_model_fits, load_model, model_hash


@dataclass
class ScoreConfig:
    data: str = ""
    model: str = ""
    out: str = "scores"
    seq_len: int = 256
    batch_size: int = 32
    precision: str = "no"  # no | bf16 | fp16
    trust_remote_code: bool = False


def score(cfg: ScoreConfig, progress: bool = True) -> ScoreStore:
    store = TokenStore.open(cfg.data)
    accelerator = Accelerator(mixed_precision=cfg.precision)
    model = load_model(cfg.model, cfg.trust_remote_code)
    check_model_fits(model, store, cfg.model)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than model {cfg.model} supports "
                         f"({model.config.max_position_embeddings}); pass a smaller --seq-len")
    model.to(accelerator.device)

    start = time.time()
    losses = token_losses(model, store, cfg.seq_len, cfg.batch_size, autocast=accelerator.autocast,
                          progress=progress, desc="score")
    seconds = time.time() - start

    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    losses.astype(np.float16).tofile(tmp / "scores.bin")
    n_scored = int(np.isfinite(losses).sum())
    manifest = {
        "format": SCORE_FORMAT,
        "token_store": str(store.path),
        "token_store_hash": store.hash,
        "tokenizer_hash": store.tokenizer_hash,
        "n_tokens": store.n_tokens,
        "model": {"name": cfg.model, "hash": model_hash(cfg.model, model)},
        "seq_len": cfg.seq_len,
        "precision": cfg.precision,
        "complete": True,
        "mean_loss": float(np.nanmean(losses)) if n_scored else None,
        "tokens_per_second": round(store.n_tokens / max(seconds, 1e-9), 1),
    }
    write_json_atomic(tmp / "manifest.json", manifest)
    replace_dir(tmp, out)
    if progress:
        print(f"score: {store.n_tokens:,} tokens, mean reference loss {manifest['mean_loss']:.4f} -> {out} "
              f"({manifest['tokens_per_second']:,.0f} tokens/s)")
    return ScoreStore.open(out, store)
