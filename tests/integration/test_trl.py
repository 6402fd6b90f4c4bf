"""rho1.trl.SelectiveSFTTrainer: TRL's SFTTrainer with rho1's selection, on GSM8K prompt-completion pairs, with
completion-only loss and packing, a tiny model saved with save_pretrained and the tests' BPE tokenizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from rho1.data.loader import IGNORE_INDEX  # noqa: E402
from rho1.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def sft_setup(stores, data_dir, tmp_path_factory):
    import datasets

    d = tmp_path_factory.mktemp("trl")
    tokenizer = stores["reference"].tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model("nano", len(tokenizer), 512, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
    model.save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    problems = [json.loads(line) for line in data_dir["reference"].read_text().splitlines()[:48]]
    ds = datasets.Dataset.from_list([{"prompt": f"Question: {p['question']}\nAnswer:", "completion": " " + p["answer"]}
                                     for p in problems])
    return d, tokenizer, ds


class Recording:
    """Wraps compute_loss: every training batch's labels (shifted) and what the selection kept."""

    def __init__(self, trainer):
        self.seen, original = [], trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            labels = inputs["labels"][:, 1:].detach().clone()
            loss = original(model, inputs, *args, **kwargs)
            if model.training:
                self.seen.append((labels, trainer.last_selection.clone(), inputs["input_ids"].detach().clone()))
            return loss

        trainer.compute_loss = compute_loss


def _trainer(sft_setup, tmp_path, packing: bool, **kw):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from rho1.trl import SelectiveSFTTrainer

    d, tokenizer, ds = sft_setup
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                     report_to=[], use_cpu=True, max_length=256, packing=packing, logging_steps=1, save_strategy="no",
                     completion_only_loss=True, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(d / "model")
    return SelectiveSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, **kw)


@pytest.mark.parametrize("packing", [False, True])
def test_selective_sft_trainer_never_selects_a_prompt_token(sft_setup, tmp_path, packing):
    d, tokenizer, ds = sft_setup
    trainer = _trainer(sft_setup, tmp_path, packing, reference_model="self", reference_update=2, ratio=0.5)
    assert trainer.score == "retrospective"
    record = Recording(trainer)
    trainer.train()
    assert len(record.seen) == 4
    for labels, kept, _ in record.seen:
        trainable = labels != IGNORE_INDEX
        assert kept.shape == labels.shape and (kept[~trainable] == 0).all()  # nothing outside the completions
        n_trainable, n_kept = int(trainable.sum()), int((kept > 0).sum())
        assert 0 < n_kept < n_trainable  # the selection kept about half of the completion tokens
        assert n_kept == pytest.approx(0.5 * n_trainable, abs=2)
    # the reference is its own model: the learner's weights after step 2 (reference_update=2), not the learner's now
    from rho1.head import reference_token_losses

    ids = record.seen[-1][2][:1, :64]
    labels = ids[:, 1:]
    with torch.no_grad():
        ref = reference_token_losses(trainer.reference_model, ids[:, :-1], labels, rounded=False)
        now = reference_token_losses(trainer.accelerator.unwrap_model(trainer.model), ids[:, :-1], labels, rounded=False)
    assert not torch.allclose(ref, now, atol=1e-4)
    # and every label inside a prompt ("Question: ...\nAnswer:", found in the decoded rows) is -100
    checked = 0
    for labels, _, input_ids in record.seen:
        for row in range(input_ids.shape[0]):
            pieces = [tokenizer.decode([int(t)]) for t in input_ids[row]]
            ends = np.cumsum([len(p) for p in pieces])
            text = "".join(pieces)
            for m in re.finditer(r"Question:.*?\nAnswer:", text, flags=re.S):
                inside = np.flatnonzero((ends - np.array([len(p) for p in pieces]) >= m.start()) & (ends <= m.end()))
                inside = inside[inside > 0] - 1  # labels[t] is the token at t + 1
                assert (labels[row, inside] == IGNORE_INDEX).all()
                checked += len(inside)
    assert checked > 100

def test_selective_sft_trainer_with_a_reference_model_trains(sft_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    d, _, _ = sft_setup
    reference = AutoModelForCausalLM.from_pretrained(d / "model")
    trainer = _trainer(sft_setup, tmp_path, True, reference_model=reference, ratio=0.6)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train()
    assert result.training_loss == result.training_loss and result.training_loss > 0
    assert trainer.score == "excess" and trainer.selection_stats["frac_selected"] == pytest.approx(0.6, abs=0.05)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_reference_losses_of_a_packed_row_are_those_of_each_sequence_alone(sft_setup, reference_model, tmp_path):
    """Under padding-free packing the reference reads the row with its position_ids, so no sequence sees the one
    before it: the losses equal those of each sequence run alone."""
    from transformers import AutoModelForCausalLM

    from rho1.head import reference_token_losses

    reference = AutoModelForCausalLM.from_pretrained(reference_model)  # trained: it reads its context
    trainer = _trainer(sft_setup, tmp_path, True, reference_model=reference, ratio=0.6)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "position_ids" in inputs and inputs["input_ids"].shape[0] == 1
    labels = inputs["labels"][:, 1:]
    packed = trainer._reference_loss(dict(inputs), labels)
    starts = torch.nonzero(inputs["position_ids"][0] == 0).flatten().tolist() + [inputs["input_ids"].shape[1]]
    assert len(starts) > 2  # several sequences in the row
    naive = reference_token_losses(reference, inputs["input_ids"][:, :-1], labels)  # one long sequence
    lo, hi = starts[1], starts[2]
    alone = reference_token_losses(reference, inputs["input_ids"][:, lo:hi - 1], labels[:, lo:hi - 1])
    assert torch.isfinite(alone).sum() > 10  # the answer is in the row
    assert float((naive[:, lo:hi - 1] - alone).nan_to_num().abs().max()) > 0.05  # read as one sequence, it differs
    for lo, hi in zip(starts[:-1], starts[1:]):
        alone = reference_token_losses(reference, inputs["input_ids"][:, lo:hi - 1], labels[:, lo:hi - 1])
        got = packed[:, lo:hi - 1]
        assert torch.equal(torch.isnan(got), torch.isnan(alone))
        assert torch.allclose(got.nan_to_num(), alone.nan_to_num(), atol=2e-2)


def test_self_reference_is_saved_with_each_checkpoint_and_restored(sft_setup, tmp_path):
    """A moving-average reference over 4 steps, checkpoints every 2: resumed from checkpoint-2, the reference (no
    longer the starting weights there) is restored and the run ends as the whole run, learner and reference."""
    from safetensors.torch import load_file

    def trainer(out):
        t = _trainer(sft_setup, out, False, reference_model="self", reference_ema=0.5, ratio=0.5)
        t.args.save_strategy, t.args.save_steps = "steps", 2
        return t

    whole = trainer(tmp_path / "whole")
    whole.train()
    at2 = load_file(tmp_path / "whole" / "out" / "checkpoint-2" / "reference.safetensors")
    at4 = load_file(tmp_path / "whole" / "out" / "checkpoint-4" / "reference.safetensors")
    start = load_file(sft_setup[0] / "model" / "model.safetensors")
    assert any(not torch.equal(at2[k], start[k]) for k in at2.keys() & start.keys())
    assert any(not torch.equal(at2[k], at4[k]) for k in at2)
    import shutil

    shutil.copytree(tmp_path / "whole" / "out" / "checkpoint-2", tmp_path / "resumed" / "out" / "checkpoint-2")
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-2"))
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    for (name, a), b in zip(whole.reference_model.state_dict().items(), resumed.reference_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_self_reference_under_trl_is_the_starting_model_not_the_learner(sft_setup, tmp_path):
    """TRL patches the learner's forward; the copy must not call it: after training, the reference's losses are
    the starting model's, and the learner's differ."""
    from transformers import AutoModelForCausalLM

    from rho1.head import reference_token_losses

    d, tokenizer, ds = sft_setup
    trainer = _trainer(sft_setup, tmp_path, False, reference_model="self", ratio=0.5)
    trainer.train()
    start = AutoModelForCausalLM.from_pretrained(d / "model").eval()
    ids = torch.tensor([tokenizer(ds[0]["prompt"] + ds[0]["completion"])["input_ids"][:64]])
    labels = ids[:, 1:]
    with torch.no_grad():
        ref = reference_token_losses(trainer.reference_model, ids[:, :-1], labels, rounded=False)
        first = reference_token_losses(start, ids[:, :-1], labels, rounded=False)
        learner = reference_token_losses(trainer.accelerator.unwrap_model(trainer.model).eval(), ids[:, :-1], labels,
                                         rounded=False)
    assert torch.allclose(ref, first, atol=1e-5)
    assert not torch.allclose(ref, learner, atol=1e-3)


def test_selective_sft_trainer_with_a_score_store_over_store_windows(stores, sft_setup, tmp_path):
    """Stored reference losses: the windows of the scored store (their answer tokens as labels), looked up by the
    collator; TRL leaves the already tokenized windows as they are."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from rho1.data.store import ScoreStore
    from rho1.hf import SelectiveCollator, windows_dataset
    from rho1.score import ScoreConfig, score
    from rho1.trl import SelectiveSFTTrainer

    d, tokenizer, _ = sft_setup
    store = stores["reference"]
    scores = score(ScoreConfig(str(store.path), str(d / "model"), str(tmp_path / "scores"), 64, train_on="target"),
                   progress=False)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, save_strategy="no", dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SelectiveSFTTrainer(model=AutoModelForCausalLM.from_pretrained(d / "model"), args=args,
                                  train_dataset=datasets.Dataset.from_list(list(windows_dataset(store, 64, "target"))),
                                  processing_class=tokenizer,
                                  data_collator=SelectiveCollator(tokenizer, scores=ScoreStore.open(scores.path, store)),
                                  ratio=0.5)
    record = Recording(trainer)
    trainer.train()
    target = np.asarray(store.target_mask) > 0
    for labels, kept, _ in record.seen:
        assert (kept[labels == IGNORE_INDEX] == 0).all() and (kept > 0).sum() > 0
    assert trainer.selection_stats["frac_selected"] == pytest.approx(0.5, abs=0.02)
    example = windows_dataset(store, 64, train_on="target")[0]
    assert all((label == IGNORE_INDEX) != bool(target[i]) for i, label in enumerate(example["labels"]))


def test_a_dataset_without_the_columns_sft_reads_is_one_sentence(sft_setup, tmp_path):
    """TRL would end in a raw KeyError: 'text' deep in its preparation; the columns are named up front."""
    from trl import SFTConfig

    from rho1.trl import SelectiveSFTTrainer

    d, tokenizer, ds = sft_setup
    raw = ds.rename_columns({"prompt": "question", "completion": "answer"})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"train_dataset has the columns 'question', 'answer', and SFT reads a text "
                                         r"column 'text' .* 'messages' \(chats\), 'prompt' and 'completion'"):
        SelectiveSFTTrainer(model=str(d / "model"), args=args, train_dataset=raw, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"eval_dataset has the columns 'prompt' \(it has 'prompt' without "
                                         r"'completion'\)"):
        SelectiveSFTTrainer(model=str(d / "model"), args=args, train_dataset=ds, processing_class=tokenizer,
                            eval_dataset=ds.remove_columns("completion"))
    # a column named as SFTConfig(dataset_text_field=...) says is taken
    texts = ds.map(lambda r: {"body": r["prompt"] + r["completion"]}, remove_columns=["prompt", "completion"])
    trainer = SelectiveSFTTrainer(model=str(d / "model"), args=SFTConfig(output_dir=str(tmp_path / "ok"), max_steps=1,
                                  report_to=[], use_cpu=True, dataset_text_field="body"), train_dataset=texts,
                                  processing_class=tokenizer, ratio=1.0)
    assert "input_ids" in trainer.train_dataset.column_names
