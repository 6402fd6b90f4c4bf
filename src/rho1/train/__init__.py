"""`rho1 train`: one loop for reference, CLM and SLM training, on accelerate.

    loop.py        setup -> fit -> train_step (read this first)
    evaluator.py   held-out metrics during training
    checkpoint.py  checkpoint layout, atomic saving, exact resume, hashes

The options are ``rho1.config.TrainConfig``.
"""

from rho1.config import TrainConfig
from rho1.train.checkpoint import Checkpointer, checkpoints, latest_checkpoint, read_training_state
from rho1.train.evaluator import Evaluator
from rho1.train.loop import Run, fit, lr_at, selection_seed, setup, train, train_step

__all__ = ["TrainConfig", "train", "setup", "fit", "train_step", "Run", "Evaluator", "Checkpointer", "checkpoints",
           "latest_checkpoint", "read_training_state", "lr_at", "selection_seed"]
