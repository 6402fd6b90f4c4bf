"""`rho1 view`: real text with each token coloured by what SLM does with it (Rho-1 App. E, Tables 6-7).

One model: the tokens in the top ``ratio`` by excess loss (learner - reference) are highlighted, the
others are not (Table 6). Several models (e.g. checkpoints at 0/33/66/100% of a run): one column each,
every token coloured by its selection tendency, the quintile of its excess loss at that checkpoint, from
deep blue (most likely kept) to dark orange (least likely) (Table 7). Hovering a token shows its learner,
reference and excess loss. Everything shown is escaped (jinja2 autoescape); the page runs no script and
loads nothing (its Content-Security-Policy forbids both).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from rho1.analysis.html import render_page
from rho1.config import ViewConfig
from rho1.data.store import ScoreStore, TokenStore, check_writable
from rho1.eval.heldout import fixed_selection
from rho1.head import linear_head_of, token_losses
from rho1.model import check_model_fits, load_model

LEVELS = ("deep blue", "light blue", "black", "light orange", "dark orange")
FRAGMENT = jinja2.Template("""\
<section class="viewer" data-mode="{{ mode }}">
<p class="legend">{% if mode == "selection" %}<span class="sample selected">selected (top {{ "%.0f" % (ratio * 100) }}% by excess loss)</span><span class="sample unselected">not selected</span>
{% else %}selection tendency (quintile of excess loss): {% for name in levels %}<span class="l{{ loop.index0 }}">{{ name }}</span>{% endfor %}{% endif %}
&middot; {{ n_tokens }} tokens shown, {{ n_selected }} selected{% if source %} &middot; {{ source }}{% endif %}</p>
<div class="columns" style="grid-template-columns: repeat({{ columns|length }}, 1fr)">
{% for col in columns %}<div><h4>{{ col.title }}</h4><div class="tokens">{% for t in col.tokens %}<span class="t {{ t.cls }}" title="learner {{ t.learner }} &middot; reference {{ t.ref }} &middot; excess {{ t.excess }}">{% for kind, text in t.parts %}{% if kind %}<span class="ctrl">{{ text }}</span>{% else %}{{ text }}{% endif %}{% endfor %}</span>{% endfor %}</div></div>
{% endfor %}</div>
</section>
""", autoescape=True)

def visible_parts(text: str) -> list[tuple[bool, str]]:
    """Split text into (is_control, text) runs; invisible control and format characters (NUL, right-to-left
    overrides, zero-width marks) are shown as their code point instead of acting on the page."""
    parts: list[tuple[bool, str]] = []
    for ch in text:
        control = ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co")
        piece = f"U+{ord(ch):04X}" if control else ch
        if parts and parts[-1][0] == control and not control:
            parts[-1] = (False, parts[-1][1] + piece)
        else:
            parts.append((control, piece))
    return parts


def token_pieces(tokenizer, ids) -> list[str]:
    """The text of each token, such that the pieces joined give the decoded text. A token holding only
    part of a character (byte-level BPE) gets '' and the character shows with the token completing it."""
    pieces, context, previous = [], [], ""
    for tid in ids:
        context.append(int(tid))
        text = tokenizer.decode(context)
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        pieces.append(text[len(previous):] if text.startswith(previous) else text)
        if len(context) > 16:  # keep a little context: some decoders change a token's text at the start
            context = context[-4:]
            previous = tokenizer.decode(context)
        else:
            previous = text
    return pieces


@dataclass
class ViewColumn:
    title: str
    learner: np.ndarray  # per shown token
    ref: np.ndarray
    selected: np.ndarray = field(default=None)


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.2f}"


def tendency_levels(excess: np.ndarray) -> np.ndarray:
    """0 (deep blue, highest excess loss) .. 4 (dark orange): the quintile of each token's excess loss."""
    order = np.argsort(-np.nan_to_num(excess, nan=-np.inf), kind="stable")
    rank = np.empty(len(excess), dtype=np.int64)
    rank[order] = np.arange(len(excess))
    return np.minimum(rank * 5 // max(len(excess), 1), 4)


def render_fragment(pieces: list[str], columns: list[ViewColumn], ratio: float, source: str = "") -> str:
    """The viewer as an HTML fragment (the report embeds it); ``columns[i].selected`` marks selected tokens."""
    mode = "selection" if len(columns) == 1 else "tendency"
    rendered = []
    for col in columns:
        excess = col.learner - col.ref
        levels = tendency_levels(excess)
        tokens = []
        for i, piece in enumerate(pieces):
            cls = ("selected" if col.selected[i] else "unselected") if mode == "selection" else f"l{levels[i]}"
            tokens.append({"cls": cls, "parts": visible_parts(piece), "learner": _fmt(col.learner[i]),
                           "ref": _fmt(col.ref[i]), "excess": _fmt(excess[i])})
        rendered.append({"title": col.title, "tokens": tokens})
    n_selected = int(columns[-1].selected.sum())
    return FRAGMENT.render(mode=mode, ratio=ratio, levels=LEVELS, columns=rendered, n_tokens=len(pieces),
                           n_selected=n_selected, source=source)


def build_view(cfg: ViewConfig) -> tuple[str, dict]:
    """The viewer fragment and its numbers (tokens shown, selected) for a store and one or more models."""
    if not cfg.model:
        raise ValueError("rho1 view needs --model (one checkpoint, or several to compare side by side)")
    if not (cfg.scores or cfg.reference):
        raise ValueError("rho1 view needs reference losses: --scores SCORE_STORE of --data, or --reference MODEL")
    store = TokenStore.open(cfg.data).check()
    scores = ScoreStore.open(cfg.scores, store).check() if cfg.scores else None
    if scores is not None and cfg.seq_len not in (None, scores.seq_len):
        raise ValueError(f"scores {scores.path} use windows of {scores.seq_len} tokens but --seq-len is {cfg.seq_len}; "
                         f"pass --seq-len {scores.seq_len} (or leave it out)")
    seq_len = cfg.seq_len or (scores.seq_len if scores is not None else 256)
    n = store.num_windows(seq_len)
    if not 0 <= cfg.start < n:
        raise ValueError(f"--start {cfg.start} is outside the store's {n} windows of {seq_len} tokens")
    windows = np.arange(cfg.start, min(n, cfg.start + cfg.windows))

    def losses(path: str) -> np.ndarray:
        model = load_model(path)
        check_model_fits(model, store, path)
        return token_losses(model, store, seq_len, cfg.batch_size, windows,
                            head_of=linear_head_of(model, store, seq_len))

    if scores is not None:
        ref_all = np.asarray(scores.scores, dtype=np.float32)
    else:
        ref_all = losses(cfg.reference)
    lo, hi = int(windows[0]) * seq_len, min(store.n_tokens, int(windows[-1] + 1) * seq_len)
    pieces = token_pieces(store.tokenizer(), store.tokens[lo:hi])
    columns = []
    for i, path in enumerate(cfg.model):
        learner = losses(path)[lo:hi]
        ref = ref_all[lo:hi].astype(np.float32)
        selected = fixed_selection(learner, ref, cfg.ratio)
        title = f"{i + 1}. {Path(path).parent.name}/{Path(path).name}" if len(cfg.model) > 1 else ""
        columns.append(ViewColumn(title, learner, ref, selected))
    fragment = render_fragment(pieces, columns, cfg.ratio, source=f"{Path(cfg.data).name}, tokens {lo:,}-{hi:,}")
    return fragment, {"tokens": len(pieces), "selected": int(columns[-1].selected.sum())}


def run_checkpoint_columns(run: str, fractions=(0.0, 1 / 3, 2 / 3, 1.0)) -> list[str]:
    """The run's checkpoints closest to 0/33/66/100% of its training, as in the paper's Table 7."""
    from rho1.analysis.dynamics import run_checkpoints

    how = ("--run shows checkpoints side by side: train with --save-every TOKENS --keep-last 0, or pass --model "
           "RUN/final for one model")
    if not (Path(run) / "config.yaml").is_file() and Path(run).is_dir():
        raise ValueError(f"{run} is not a run folder of `rho1 train` (no config.yaml); pass the --out of a run")
    try:
        found = run_checkpoints(Path(run))
    except ValueError as err:
        if "checkpoint(s)" not in str(err):
            raise
        raise ValueError(f"run {run} has fewer than 2 checkpoints; {how}") from None
    last = found[-1][0]
    chosen = []
    for f in fractions:
        path = str(min(found, key=lambda c: abs(c[0] - f * last))[1])
        if path not in chosen:
            chosen.append(path)
    return chosen


def view(cfg: ViewConfig, progress: bool = True) -> dict:
    cfg.check()
    check_writable(cfg.out, folder=False)
    fragment, numbers = build_view(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(f"rho1 token viewer: {Path(cfg.data).name}", fragment))
    if progress:
        print(f"view: {numbers['tokens']:,} tokens, {numbers['selected']:,} selected (top {cfg.ratio:.0%} by excess "
              f"loss) -> {out}")
    return {**numbers, "path": str(out)}
