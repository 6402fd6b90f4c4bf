"""`rho1 export`: static token selection for any trainer. The windows of a TokenStore, in the order
`rho1 train --seed` reads them, with ``labels`` = -100 on every token the rule drops, as Parquet shards and
as a Hugging Face ``datasets`` folder (``load_from_disk``). A trainer that only takes labels (Megatron,
nanotron, torchtitan, axolotl, TRL, ``transformers.Trainer``) then trains on the selected tokens.

This is SLM with the excess loss measured once, against the fixed ``--model`` (the planned run's starting
model), instead of against the model being trained at each step: the selection cannot follow what the model
has already learned. Tokens are ranked in groups of ``--batch-size`` windows, as `rho1 train` ranks one
micro-batch, so the first group is what `rho1 train` selects at its first step (with one process, no
gradient accumulation and full precision; float rounding aside); with ``--selection-scope dataset`` every
token of the store is ranked at once (Token Cleaning's global ranking). ``--train-on target`` ranks and
labels the target tokens only (the answers), so no prompt token is ever labelled.

Layout: ``OUT/parquet/part-00000.parquet ...`` (columns ``input_ids``, ``labels``, ``offset``, the position
of the window's first token in the store, and, for soft rules or with ``--weights``, ``weights``),
``OUT/dataset/`` and ``OUT/manifest.json`` naming the store, scores, model and rule. `rho1 train --selection
OUT` trains on these labels with rho1's own loop. Written into ``OUT.partial`` and moved into place at the end, so a killed export leaves no ``OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from rho1.accel import compute_dtype
from rho1.config import ExportConfig
from rho1.data.export_format import EXPORT_FORMAT
from rho1.data.loader import IGNORE_INDEX, WindowOrder, make_batch, trainable_mask
from rho1.data.store import ScoreStore, check_writable, open_with_scores
from rho1.head import batch_token_losses, linear_head_of, token_losses
from rho1.interrupt import Interrupted, stop_if_ctrl_c
from rho1.lock import check_not_inside, write_lock
from rho1.model import check_model_fits, load_model, model_hash
from rho1.progress import progress_bar
from rho1.selection import get_rule, select_from_token_loss
from rho1.threads import set_threads

MARKER = ".rho1-export-in-progress"


def _check_out(out: Path) -> Path:
    """``out`` must not exist (an export is never written over anything); returns its partial folder."""
    check_writable(out)
    if out.exists():
        raise ValueError(f"--out {out} already exists; choose a new folder (an export never replaces anything)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        if not (partial / MARKER).is_file():
            raise ValueError(f"{partial} exists and was not left by `rho1 export`; move it away or choose another --out")
        shutil.rmtree(partial)  # what an interrupted export of ours left
    return partial


def _shard_writer(path: Path, with_weights: bool):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("labels", pa.list_(pa.int32())),
              pa.field("offset", pa.int64())]
    if with_weights:
        fields.append(pa.field("weights", pa.list_(pa.float32())))
    return pq.ParquetWriter(path, pa.schema(fields))


def _table(input_ids: list, labels: list, offsets: np.ndarray, weights: list | None):
    import pyarrow as pa

    columns = {"input_ids": pa.array([r.astype(np.int32) for r in input_ids], pa.list_(pa.int32())),
               "labels": pa.array([r.astype(np.int32) for r in labels], pa.list_(pa.int32())),
               "offset": pa.array(np.asarray(offsets, dtype=np.int64), pa.int64())}
    if weights is not None:
        columns["weights"] = pa.array([r.astype(np.float32) for r in weights], pa.list_(pa.float32()))
    return pa.table(columns)


def group_labels(batch, weights: torch.Tensor, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hugging Face rows of one group: ``input_ids`` (padding cut off), ``labels`` (the token where it has a
    weight, else -100; the model shifts them itself) and per-token ``weights`` aligned with ``labels``;
    ``lengths``: the real tokens of each row."""
    input_ids = batch.input_ids.numpy()
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    token_weights = np.zeros(input_ids.shape, dtype=np.float32)
    w = weights.float().cpu().numpy()  # w[b, t] weighs the prediction of token t + 1
    kept = w > 0
    labels[:, 1:] = np.where(kept[:, :-1], input_ids[:, 1:], IGNORE_INDEX)
    token_weights[:, 1:] = np.where(kept[:, :-1], w[:, :-1], 0.0)
    return ([row[:n] for row, n in zip(input_ids, lengths)], [row[:n] for row, n in zip(labels, lengths)],
            [row[:n] for row, n in zip(token_weights, lengths)])


def export(cfg: ExportConfig, progress: bool = True) -> dict:
    """Write the selected windows to ``cfg.out``; returns the manifest."""
    cfg.check()
    if cfg.threads:
        set_threads(cfg.threads)  # leaves torch alone when it already uses that many
    out = Path(cfg.out)
    check_not_inside(out, {"--data": cfg.data, "--scores": cfg.scores, "--model": cfg.model})
    with write_lock(out, "rho1 export"):
        return _export(cfg, out, progress)


def _export(cfg: ExportConfig, out: Path, progress: bool) -> dict:
    partial = _check_out(out)
    if cfg.seq_len is None:  # the scores' windows, as `rho1 eval` and `rho1 view` take them
        cfg.seq_len = ScoreStore.open(cfg.scores).seq_len if cfg.scores else 256
    store, scores = open_with_scores(cfg.data, cfg.scores, cfg.seq_len, "export")
    trainable_mask(store, cfg.train_on)  # a store without target tokens: one sentence before the model loads
    model = load_model(cfg.model, cfg.trust_remote_code, dtype=compute_dtype(cfg.precision))
    check_model_fits(model, store, cfg.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    with_weights = cfg.weights or not get_rule(cfg.rule).hard
    partial.mkdir(parents=True)
    (partial / MARKER).write_text("")  # first in, last out: a .partial without it is not ours
    (partial / "parquet").mkdir()
    try:
        shards, totals = _write_shards(cfg, store, scores, model, partial, with_weights, progress)
    except KeyboardInterrupt:
        raise Interrupted(f"export interrupted; nothing was written to {out}: run the same command again") from None
    _write_dataset(partial, shards, progress)
    manifest = _manifest(cfg, store, scores, model, shards, totals, with_weights)
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.replace(partial, out)
    (out / MARKER).unlink()
    if progress:
        print(f"export: {manifest['windows']:,} windows, {manifest['frac_selected']:.1%} of {totals['valid']:,} tokens "
              f"kept ({cfg.rule}) -> {out}/parquet ({len(shards)} shards), {out}/dataset")
    return manifest


def _write_shards(cfg: ExportConfig, store, scores, model, partial: Path, with_weights: bool, progress: bool):
    """Every window in `rho1 train`'s order, ranked a group of --batch-size windows at a time, into Parquet
    shards of about --shard-windows windows; returns the shards' names and the token counts."""
    device = next(model.parameters()).device
    head_of = linear_head_of(model, store, cfg.seq_len)
    n_windows = store.num_windows(cfg.seq_len)
    order = WindowOrder(n_windows, cfg.seed).take(0, n_windows)  # one epoch, in rho1 train's order
    keep = trainable_mask(store, cfg.train_on)
    everywhere, n_valid = dataset_weights(cfg, store, scores, model, keep, progress) \
        if cfg.selection_scope == "dataset" else (None, 0)
    shards, writer, in_shard = [], None, 0
    totals = {"valid": 0, "selected": 0, "weight": 0.0}
    bar = progress_bar(total=n_windows * cfg.seq_len, desc="export", unit="tok", unit_scale=True, disable=not progress)
    try:
        for group, start in enumerate(range(0, n_windows, cfg.batch_size)):
            stop_if_ctrl_c()
            windows = order[start : start + cfg.batch_size]
            batch = make_batch(store, windows, cfg.seq_len, scores, keep)
            if everywhere is None:
                losses = batch_token_losses(model, batch.input_ids.to(device), batch.labels.to(device),
                                            head_of=head_of, dtype=compute_dtype(cfg.precision)).cpu()
                generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + group)  # as rho1 train's step `group`
                picked = select_from_token_loss(losses, batch.labels, batch.ref_loss, cfg.ratio, cfg.score,
                                                generator=generator, rule=cfg.rule, rule_options=cfg.rule_options)
                group_weights = picked.weights
                totals["valid"] += picked.n_valid
            else:
                at = batch.positions.numpy()
                group_weights = torch.from_numpy(np.where(at >= 0, everywhere[np.maximum(at, 0)], 0.0))
            totals["selected"] += int((group_weights > 0).sum())
            totals["weight"] += float(group_weights.sum())
            offsets = windows.astype(np.int64) * cfg.seq_len
            lengths = np.minimum(offsets + cfg.seq_len, store.n_tokens) - offsets
            ids, labels, weights = group_labels(batch, group_weights, lengths)
            if writer is None:  # a shard holds whole groups, --shard-windows windows or a few more
                shards.append(f"parquet/part-{len(shards):05d}.parquet")
                writer, in_shard = _shard_writer(partial / shards[-1], with_weights), 0
            writer.write_table(_table(ids, labels, offsets, weights if with_weights else None))
            in_shard += len(ids)
            if in_shard >= cfg.shard_windows:
                writer.close()
                writer = None
            bar.update(len(ids) * cfg.seq_len)
        if writer is not None:
            writer.close()
    finally:
        bar.close()
    if everywhere is not None:
        totals["valid"] = n_valid
    return shards, totals


def dataset_weights(cfg: ExportConfig, store, scores, model, keep, progress: bool) -> tuple[np.ndarray, int]:
    """The rule's weight of every token of the store, ranked all at once (one float32 per token): the model's
    loss of each token given its window, scored against the ScoreStore, the top --ratio of the store's valid
    tokens (for topk) kept; and how many tokens could be kept."""
    losses = token_losses(model, store, cfg.seq_len, cfg.batch_size, progress=progress, desc="export: losses",
                          head_of=linear_head_of(model, store, cfg.seq_len), dtype=compute_dtype(cfg.precision))
    valid = np.isfinite(losses) if keep is None else np.isfinite(losses) & (np.asarray(keep) > 0)
    labels = torch.from_numpy(np.where(valid, 0, IGNORE_INDEX))[None]
    ref = None if scores is None else torch.from_numpy(np.asarray(scores.scores, np.float32))[None]
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003)
    picked = select_from_token_loss(torch.from_numpy(np.nan_to_num(losses))[None], labels, ref, cfg.ratio, cfg.score,
                                    generator=generator, rule=cfg.rule, rule_options=cfg.rule_options)
    return picked.weights[0].numpy().astype(np.float32), picked.n_valid


def _write_dataset(partial: Path, shards: list[str], progress: bool) -> None:
    """The shards as a `datasets` folder (load_from_disk); datasets' own cache stays inside the partial folder."""
    import datasets

    cache = partial / "cache"
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_parquet([str(partial / s) for s in shards], cache_dir=str(cache)).save_to_disk(
            str(partial / "dataset"))
    finally:
        if bars:
            datasets.enable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)


def _manifest(cfg: ExportConfig, store, scores, model, shards: list[str], totals: dict, with_weights: bool) -> dict:
    return {
        "format": EXPORT_FORMAT, "token_store": str(store.path.resolve()), "token_store_hash": store.hash,
        "tokenizer_hash": store.tokenizer_hash, "scores": str(Path(cfg.scores).resolve()) if cfg.scores else None,
        "scores_sha256": scores.manifest.get("sha256") if scores is not None else None,
        "model": {"name": cfg.model, "hash": model_hash(cfg.model, model)},
        "rule": cfg.rule, "score": cfg.score, "ratio": cfg.ratio, "rule_options": cfg.rule_options,
        "selection_scope": cfg.selection_scope, "train_on": cfg.train_on,
        "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "windows": store.num_windows(cfg.seq_len),
        "shards": shards, "columns": ["input_ids", "labels", "offset", *(["weights"] if with_weights else [])],
        "valid_tokens": totals["valid"], "tokens_with_a_label": totals["selected"],
        "frac_selected": totals["weight"] / max(totals["valid"], 1),
        "note": "static selection: the excess loss was measured once against --model, not against the model being "
                "trained; labels are -100 where the rule gives a token no weight"
                + ("; a soft rule gives almost every token some weight, so use the weights column (a trainer that "
                   "ignores it trains on nearly every token)" if not get_rule(cfg.rule).hard else ""),
    }
