"""`rho1 dynamics`, `rho1 view` and `rho1 report`: looking at runs."""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_not_self, check_positive, check_ratio, check_seq_len
from rho1.config.options import (
    opt,
)


@dataclass
class DynamicsConfig:
    run: str = opt("", "run folder of `rho1 train` (saved with --save-every and --keep-last 0)", positional=True)
    data: str = opt("", "held-out TokenStore")
    out: str | None = opt(None, "output folder (default RUN/dynamics)", short="-o")
    seq_len: int | None = opt(None, "window length (default: the run's)")
    batch_size: int = opt(16, "windows per forward")
    max_windows: int = opt(64, "held-out windows evaluated (0: all)")
    threshold: float = opt(0.2, "|dL| above which a token is H->L or L->H")
    include_start: bool = opt(True, "leave out the model the run started from", flag="--no-start")
    examples: int = opt(4, "example trajectories plotted per fluctuating class")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")

    def check(self) -> None:
        if not self.run or not self.data:
            raise ValueError("rho1 dynamics needs a run folder and --data HELDOUT_STORE")
        check_seq_len(self.seq_len)
        check_positive(self, "batch_size", "threads")
        check_positive(self, "max_windows", "threshold", "examples", allow_zero=("max_windows", "examples"))


@dataclass
class ViewConfig:
    data: str = opt("", "TokenStore whose text is shown (corpus or held-out)")
    model: list[str] = opt(factory=list, help="one model, or several checkpoints side by side (selection tendency)")
    scores: str | None = opt(None, "ScoreStore of --data (reference losses)")
    reference: str | None = opt(None, "instead of --scores: a reference model run on --data")
    out: str = opt("view.html", "HTML file to write", short="-o")
    ratio: float = opt(0.6, "fraction of tokens highlighted")
    seq_len: int | None = opt(None, "window length (default: the ScoreStore's, else 256)")
    windows: int = opt(2, "windows of --seq-len tokens shown")
    start: int = opt(0, "first window shown")
    batch_size: int = opt(16, "windows per forward")

    def check(self) -> None:
        check_not_self("--reference", self.reference, "rho1 view")
        check_ratio(self.ratio)
        check_seq_len(self.seq_len)
        check_positive(self, "windows", "batch_size")
        check_positive(self, "start", allow_zero=("start",))


@dataclass
class ReportConfig:
    runs: list[str] = opt(factory=list, help="run folders of `rho1 train`", positional=True)
    out: str = opt("report.html", "HTML file to write", short="-o")
    target: str | None = opt(None, "eval metric compared (default: the first eval store's target_loss)")
    baseline: str | None = opt(None, "run (folder name) token efficiency is measured against (default: the first "
                               "CLM run)")

    def check(self) -> None:
        if not self.runs:
            raise ValueError("rho1 report needs at least one run folder of `rho1 train`")
