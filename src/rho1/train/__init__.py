"""`rho1 train`: one loop for reference, CLM and SLM training, on accelerate.

    loop.py        train = setup -> fit (read this first): the optimizer steps, evaluations, checkpoints, summary
    build.py       setup: data, model, optimizer, evaluator, resumed position, the --out lock; the first line
    step.py        train_step: one optimizer step (micro-batches, selection, normalised gradients)
    reference.py   the reference run in the loop: online, or the learner itself (self, its EMA, its copies)
    run.py         Run: the state setup builds and fit moves
    metrics.py     metrics.jsonl and trackers: loss, selection statistics, throughput, MFU
    evaluator.py   held-out metrics during training
    checkpoint.py  checkpoint layout, atomic saving, exact resume, hashes
    trackers.py    tensorboard / wandb / mlflow / trackio through accelerate

The options are ``rho1.config.TrainConfig``.
"""

from rho1.config import TrainConfig
from rho1.train.build import setup
from rho1.train.checkpoint import Checkpointer, checkpoints, latest_checkpoint, read_training_state
from rho1.train.evaluator import Evaluator
from rho1.train.loop import fit, train
from rho1.train.run import Run
from rho1.train.step import lr_at, selection_seed, train_step

__all__ = ["TrainConfig", "train", "setup", "fit", "train_step", "Run", "Evaluator", "Checkpointer", "checkpoints",
           "latest_checkpoint", "read_training_state", "lr_at", "selection_seed"]
