"""Experiment trackers (`--report-to`, transformers' option name) through accelerate's trackers: every record
of metrics.jsonl is also logged there, with the run's options as its config. `rho1 report` stays the view
that needs nothing but the run folder."""

from __future__ import annotations

import importlib.util
import math

from rho1.config import TRACKERS

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def trackers(report_to: list[str]) -> list[str]:
    """The trackers asked for, or one sentence naming the package missing and its pip command; ``all``
    means every one that is installed."""
    if not report_to or report_to == ["none"]:
        return []
    if "all" in report_to:
        return [name for name in TRACKERS if installed(name)]
    for name in report_to:
        if not installed(name):
            raise ValueError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install 'rho1[{name}]' "
                             f"(or pip install {PACKAGES[name]})")
    return list(dict.fromkeys(report_to))


def tracker_config(options: dict) -> dict:
    """The run's options as trackers take them: numbers, strings and booleans (TensorBoard's hparams refuse
    lists and None)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in options.items()}


def numbers(record: dict) -> dict:
    """The finite numbers of a metrics record (what every tracker accepts), keyed as in metrics.jsonl."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and k != "step"}
