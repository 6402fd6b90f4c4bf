"""A score function registered from Python, with no edit to rho1, works in every stage."""

import pytest
from conftest import SEQ_LEN, read_metrics
from transformers import TrainingArguments

from rho1.config import SweepConfig, TrainConfig
from rho1.experiments.sweep import sweep
from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
from rho1.model import load_model
from rho1.selection import SCORES, register_score
from rho1.train import train


@pytest.fixture
def hardest_for_reference():
    """Keep the tokens the reference finds hardest (the opposite of the `reference` ablation)."""
    calls = []

    def score(learner, reference, generator=None):
        calls.append(tuple(learner.shape))
        return reference

    register_score("ref-hard", score, needs_reference=True, help="the reference's hardest tokens")
    yield calls
    del SCORES["ref-hard"]


def test_registered_score_trains_in_train_trainer_and_sweep(hardest_for_reference, stores, corpus_scores,
                                                             reference_model, tmp_path):
    common = dict(data=str(stores["corpus"].path), model_preset="nano", seq_len=SEQ_LEN, batch_size=4,
                  max_tokens=2048, scores=str(corpus_scores.path))
    train(TrainConfig(out=str(tmp_path / "run"), objective="slm", ratio=0.5, score="ref-hard", **common),
          progress=False)
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(steps) == 8 and hardest_for_reference
    assert all(r["ref_loss_selected"] > r["ref_loss_unselected"] for r in steps)

    calls = len(hardest_for_reference)
    ds = windows_dataset(stores["corpus"], SEQ_LEN)[:8]
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = SelectiveTrainer(model=load_model(str(reference_model)), args=args, train_dataset=ds, ratio=0.5,
                               score="ref-hard",
                               data_collator=SelectiveCollator(stores["corpus"].tokenizer(), scores=corpus_scores))
    trainer.train()
    assert len(hardest_for_reference) > calls
    assert trainer.selection_stats["ref_loss_selected"] > trainer.selection_stats["ref_loss_unselected"]

    result = sweep(SweepConfig(train=TrainConfig(eval_data=[str(stores["heldout"].path)], **common),
                               ratios=[1.0], score_functions=["ref-hard"], ablation_ratio=0.5,
                               out=str(tmp_path / "sweep")), progress=False)
    assert set(result["runs"]) == {"clm", "ratio-0.5", "score-ref-hard"}
    assert result["runs"]["score-ref-hard"]["score"] == "ref-hard"
