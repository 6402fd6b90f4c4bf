"""What `rho1 export` writes, as the stages that read it see it: the format's name, and the stream positions of
a store whose tokens an export labelled (what `rho1 train --selection` trains on). Below the stages, so the data
loader and `rho1 export` both use it without importing each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rho1.data.store import IGNORE_INDEX, TokenStore, read_json
from rho1.selection.rules import get_rule

EXPORT_FORMAT = "rho1-export-1"


def kept_positions(path: str | Path, store: TokenStore, seq_len: int | None) -> np.ndarray:
    """1 per stream position of ``store`` whose token an export labelled (its ``offset`` + the label's index),
    after checking that the export was made from this store with these windows and a rule without weights."""
    import pyarrow.parquet as pq

    path = Path(path)
    how = "export it again with `rho1 export`"
    manifest = read_json(path / "manifest.json", how) if (path / "manifest.json").is_file() else None
    if manifest is None or manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"--selection {path} is not an export of `rho1 export` (no manifest.json of format "
                         f"{EXPORT_FORMAT}); pass the --out folder of `rho1 export`")
    if manifest["token_store_hash"] != store.hash:
        if Path(manifest["token_store"]).resolve() == Path(store.path).resolve():
            raise ValueError(f"the TokenStore {store.path} was prepared again since --selection {path} was exported "
                             "from it, so the export's positions no longer name its tokens; export it again with "
                             "`rho1 export`")
        raise ValueError(f"--selection {path} was made from another TokenStore ({manifest['token_store']}), not "
                         f"{store.path}; pass that store as --data, or export this one")
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise ValueError(f"--selection {path} holds windows of {manifest['seq_len']} tokens but --seq-len is "
                         f"{seq_len}; pass --seq-len {manifest['seq_len']}")
    if "weights" in manifest["columns"] and not get_rule(manifest["rule"]).hard:
        raise ValueError(f"--selection {path} was made with the soft rule {manifest['rule']!r}, whose weights rho1 "
                         "train --selection does not read; export with a hard rule (topk, threshold)")
    if "offset" not in manifest["columns"]:
        raise ValueError(f"--selection {path} has no offset column (made by an older rho1); {how}")
    keep = np.zeros(store.n_tokens, dtype=np.uint8)
    for shard in manifest["shards"]:
        table = pq.read_table(path / shard, columns=["labels", "offset"])
        for labels, offset in zip(table.column("labels").to_numpy(zero_copy_only=False),
                                  table.column("offset").to_numpy()):
            keep[offset + np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)] = 1
    return keep
