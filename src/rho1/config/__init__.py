"""Every stage's options, one dataclass each in a module of its own, and how they are read from YAML files and
the command line (files.py). `rho1`'s command line is generated from these dataclasses (rho1.cli).

Imports nothing heavy (no torch, transformers or matplotlib), so `rho1 --help` and every refusal of a bad
option answer at once, before a model is loaded. ``from rho1.config import TrainConfig`` names them all.
"""

from rho1.config.analysis import DynamicsConfig, ReportConfig, ViewConfig
from rho1.config.eval import AnswerConfig, EvalConfig
from rho1.config.experiments import DEMO_PRESETS, DemoConfig, SweepConfig
from rho1.config.export import ExportConfig
from rho1.config.files import config_from_dict, load_yaml
from rho1.config.options import (
    ATTENTION,
    MODEL_PRESETS,
    PRECISIONS,
    TRACKERS,
    TRAIN_ON,
    TRAIN_ON_HELP,
    opt,
)
from rho1.config.pipeline import PipelineConfig, Recipe, load_recipe
from rho1.config.prepare import PrepareConfig
from rho1.config.score import ScoreConfig
from rho1.config.train import TrainConfig
from rho1.config.verify import VerifyConfig
from rho1.interrupt import Interrupted, on_ctrl_c, stop_if_ctrl_c

__all__ = ["PrepareConfig", "ScoreConfig", "TrainConfig", "ExportConfig", "EvalConfig", "AnswerConfig", "SweepConfig",
           "DynamicsConfig", "ViewConfig", "ReportConfig", "DemoConfig", "DEMO_PRESETS", "config_from_dict",
           "load_yaml", "opt", "ATTENTION", "MODEL_PRESETS", "PRECISIONS", "TRACKERS", "TRAIN_ON", "TRAIN_ON_HELP",
           "Interrupted", "on_ctrl_c", "stop_if_ctrl_c", "PipelineConfig", "Recipe", "load_recipe", "VerifyConfig"]
