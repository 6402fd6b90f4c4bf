"""`rho1 dynamics`: per-token losses of a held-out TokenStore at every checkpoint of a run, and the
paper's four classes of token (Rho-1 Sec. 2.1, App. B.1, Fig. 3).

The matrix ``losses[checkpoint, token]`` is computed once and kept in ``RUN/dynamics/``. For each token a
line ``l(t) = a t + b`` is fitted over the checkpoints (t = tokens trained); ``dL`` is the fitted change
from the first to the last checkpoint. ``dL < -threshold``: H->L (learned); ``dL > threshold``: L->H
(forgotten); otherwise L->L when the token's loss at the last checkpoint is at most the mean loss of all
tokens there, else H->H.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from rho1.analysis.plots import figure, to_data_uri
from rho1.config import DynamicsConfig
from rho1.data.store import TokenStore, check_writable, read_json
from rho1.head import linear_head_of, token_losses
from rho1.model import load_model
from rho1.train.checkpoint import checkpoints

CLASSES = ("H->H", "L->H", "H->L", "L->L")
COLORS = {"H->H": "#d62728", "L->H": "#ff7f0e", "H->L": "#1f77b4", "L->L": "#2ca02c"}


def run_checkpoints(run: Path, include_start: bool = True) -> list[tuple[int, Path]]:
    """(tokens trained, HF checkpoint folder) of a run, in training order."""
    if not run.is_dir():
        raise ValueError(f"run {run} does not exist; pass the --out folder of a `rho1 train` run")
    found = []
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    start = config.get("model")
    if include_start and start and (Path(start) / "config.json").is_file():
        found.append((0, Path(start)))
    found += [(int(p.name), p) for p in checkpoints(run)]
    final = run / "final"
    if (final / "rho1_state.json").is_file():
        found.append((read_json(final / "rho1_state.json")["tokens"], final))
    if len(found) < 2:
        raise ValueError(f"run {run} has {len(found)} checkpoint(s); dynamics need at least 2: train with "
                         "--save-every TOKENS --keep-last 0")
    return found


def classify(losses: np.ndarray, tokens: np.ndarray | None = None, threshold: float = 0.2):
    """The paper's class of each token from its losses over checkpoints (``losses[checkpoint, token]``).

    Returns ``(classes, delta)``: an index into CLASSES per token and the fitted change dL."""
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.shape[0]
    t = np.arange(n, dtype=np.float64) if tokens is None else np.asarray(tokens, dtype=np.float64)
    if n < 2:
        raise ValueError("classifying token dynamics needs losses at 2 or more checkpoints")
    tc = t - t.mean()
    slope = (tc[:, None] * (losses - losses.mean(0))).sum(0) / (tc**2).sum()
    delta = slope * (t[-1] - t[0])
    last = losses[-1]
    classes = np.where(last <= last.mean(), CLASSES.index("L->L"), CLASSES.index("H->H"))
    classes = np.where(delta > threshold, CLASSES.index("L->H"), classes)
    classes = np.where(delta < -threshold, CLASSES.index("H->L"), classes)
    return classes, delta


@dataclass
class Dynamics:
    tokens: np.ndarray  # tokens trained at each checkpoint
    names: list[str]  # checkpoint folders
    positions: np.ndarray  # stream positions in the held-out store of the evaluated tokens
    losses: np.ndarray  # [checkpoint, token] float32
    classes: np.ndarray
    delta: np.ndarray
    threshold: float

    def shares(self) -> dict[str, float]:
        return {c: float((self.classes == i).mean()) for i, c in enumerate(CLASSES)}

    def class_means(self) -> dict[str, list[float]]:
        """Mean loss of each class at each checkpoint (Fig. 3a)."""
        return {c: [float(x) for x in self.losses[:, self.classes == i].mean(1)] if (self.classes == i).any() else []
                for i, c in enumerate(CLASSES)}

    def fluctuating(self, name: str, k: int) -> np.ndarray:
        """The ``k`` tokens of a class that move most around their fitted line (Fig. 3b, 3c)."""
        idx = np.flatnonzero(self.classes == CLASSES.index(name))
        if not len(idx):
            return idx
        x = self.tokens.astype(np.float64)
        y = self.losses[:, idx].astype(np.float64)
        coef = np.polyfit(x, y, 1)
        residual = (y - (coef[0][None] * x[:, None] + coef[1][None])).std(0)
        return idx[np.argsort(-residual, kind="stable")[:k]]

    def plots(self, out: Path | None = None, examples: int = 4) -> dict[str, str]:
        """Fig. 3a (mean loss per class) and 3b/3c (fluctuating L->L and H->H tokens, when the class has any)
        as data URIs."""
        uris = {}
        fig, ax = figure()
        for c, means in self.class_means().items():
            if means:
                ax.plot(self.tokens, means, marker="o", color=COLORS[c], label=f"{c} ({self.shares()[c]:.0%})")
        ax.set(xlabel="tokens trained", ylabel="mean held-out token loss", title="Token loss by class")
        ax.legend()
        uris["classes"] = to_data_uri(fig, out / "classes.png" if out else None)
        for c in ("L->L", "H->H"):
            if not (self.classes == CLASSES.index(c)).any():
                continue
            fig, ax = figure()
            for i in self.fluctuating(c, examples):
                ax.plot(self.tokens, self.losses[:, i], marker=".", alpha=0.8)
            ax.set(xlabel="tokens trained", ylabel="token loss", title=f"Fluctuating {c} tokens")
            uris[c] = to_data_uri(fig, out / f"examples_{c.replace('->', '_')}.png" if out else None)
        return uris

    def summary(self) -> dict:
        return {"checkpoints": len(self.tokens), "tokens_evaluated": int(self.losses.shape[1]),
                "threshold": self.threshold, "shares": self.shares(), "class_mean_loss": self.class_means(),
                "checkpoint_tokens": [int(t) for t in self.tokens]}


def _pruned_checkpoints(run: Path, run_cfg: dict) -> int:
    """How many of the run's periodic checkpoints were deleted by --keep-last (0 when none were)."""
    save_every, keep_last = run_cfg.get("save_every") or 0, run_cfg.get("keep_last") or 0
    final = run / "final" / "rho1_state.json"
    if not (save_every and keep_last and final.is_file()):
        return 0
    tokens = read_json(final)["tokens"]
    written = max(0, (tokens - 1) // save_every)  # one every save_every tokens before the end
    kept = sum(p.name.isdigit() for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else 0
    return max(0, written - kept)


def compute_dynamics(cfg: DynamicsConfig, progress: bool = True) -> Dynamics:
    cfg.check()
    run = Path(cfg.run)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run} is not a run folder of `rho1 train` (no config.yaml)")
    out = Path(cfg.out) if cfg.out else run / "dynamics"
    check_writable(out)
    store = TokenStore.open(cfg.data).check()
    run_cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    seq_len = cfg.seq_len or run_cfg.get("seq_len") or 256
    checkpoints = run_checkpoints(run, cfg.include_start)
    n = store.num_windows(seq_len)
    windows = np.arange(min(n, cfg.max_windows) if cfg.max_windows else n)
    if progress:
        pruned = _pruned_checkpoints(run, run_cfg)
        print(f"dynamics: {len(checkpoints)} checkpoints, {len(windows)} of {n} held-out windows"
              + ("" if len(windows) == n else " (--max-windows 0 for all)"))
        if pruned:
            print(f"dynamics: warning: the run kept only its last {run_cfg.get('keep_last')} checkpoints; about "
                  f"{pruned} earlier ones were deleted (train with --keep-last 0 to keep every checkpoint)")
    identity = {"store_hash": store.hash, "seq_len": seq_len, "windows": len(windows),
                "checkpoints": [[t, str(p)] for t, p in checkpoints]}
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("identity") == identity:
        losses = np.load(out / "losses.npy", allow_pickle=False)
        positions = np.load(out / "positions.npy", allow_pickle=False)
    else:
        rows = []
        for i, (tokens, path) in enumerate(checkpoints):
            model = load_model(str(path))
            row = token_losses(model, store, seq_len, cfg.batch_size, windows, progress=progress,
                               desc=f"dynamics {i + 1}/{len(checkpoints)} ({tokens:,} tokens)",
                               head_of=linear_head_of(model, store, seq_len))
            rows.append(row)
        full = np.stack(rows)
        positions = np.flatnonzero(np.isfinite(full).all(0))
        losses = full[:, positions].astype(np.float32)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "losses.npy", losses, allow_pickle=False)
        np.save(out / "positions.npy", positions, allow_pickle=False)
    tokens = np.array([t for t, _ in checkpoints])
    classes, delta = classify(losses, tokens, cfg.threshold)
    dyn = Dynamics(tokens, [str(p) for _, p in checkpoints], positions, losses, classes, delta, cfg.threshold)
    out.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps({"identity": identity, "config": asdict(cfg), **dyn.summary()}, indent=2))
    dyn.plots(out, cfg.examples)
    if progress:
        shares = ", ".join(f"{c} {s:.0%}" for c, s in dyn.shares().items())
        print(f"dynamics: {losses.shape[1]:,} tokens x {len(tokens)} checkpoints; {shares} -> {out}")
    return dyn
