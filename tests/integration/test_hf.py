"""Hugging Face integration: datasets as sources, SelectiveTrainer, and lm-evaluation-harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MATH_TEMPLATE, SEQ_LEN
from transformers import Trainer, TrainingArguments

from rho1.data.prepare import PrepareConfig, prepare
from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
from rho1.model import load_model
from rho1.selection import selective_loss

HERE = Path(__file__).parent


def test_saved_and_loaded_hf_datasets_are_sources(data_dir, stores, tmp_path):
    import datasets

    records = [json.loads(line) for line in data_dir["heldout"].read_text().splitlines()]
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:40]),
                               "test": datasets.Dataset.from_list(records[40:])})
    ds.save_to_disk(str(tmp_path / "saved"))
    kw = dict(tokenizer=str(stores["corpus"].path), template=MATH_TEMPLATE, target_field="answer")
    from_jsonl = prepare(PrepareConfig([str(data_dir["heldout"])], str(tmp_path / "a"), **kw), progress=False)
    train = prepare(PrepareConfig([str(tmp_path / "saved")], str(tmp_path / "b"), **kw), progress=False)
    test = prepare(PrepareConfig([str(tmp_path / "saved")], str(tmp_path / "c"), split="test", **kw), progress=False)
    assert train.n_tokens + test.n_tokens == from_jsonl.n_tokens
    np.testing.assert_array_equal(np.concatenate([train.tokens, test.tokens]), from_jsonl.tokens)
    assert test.target_mask is not None and test.manifest["split"] == "test"
    # load_dataset of a local folder of data files (hf:PATH), no network
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "data.jsonl").write_text(data_dir["heldout"].read_text())
    hub_style = prepare(PrepareConfig([f"hf:{tmp_path / 'folder'}"], str(tmp_path / "d"), **kw), progress=False)
    np.testing.assert_array_equal(hub_style.tokens, from_jsonl.tokens)
    with pytest.raises(ValueError, match="has no split 'validation'; pass --split with one of: train, test"):
        prepare(PrepareConfig([str(tmp_path / "saved")], str(tmp_path / "e"), split="validation", **kw),
                progress=False)


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=4, seed=0,
                report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer):
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("accum", [1, 2])
def test_selective_trainer_at_ratio_one_is_trainer(stores, reference_model, tmp_path, accum):
    ds = windows_dataset(stores["corpus"], SEQ_LEN)[:40]
    tok = stores["corpus"].tokenizer()
    results = {}
    for name, cls, kw in (("plain", Trainer, {}), ("slm", SelectiveTrainer, {"ratio": 1.0, "score": "learner"})):
        model = load_model(str(reference_model))
        trainer = cls(model=model, args=_args(tmp_path / name, gradient_accumulation_steps=accum), train_dataset=ds,
                      data_collator=SelectiveCollator(tok), **kw)
        trainer.train()
        results[name] = (_losses(trainer), torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert len(results["plain"][0]) == 4
    assert results["slm"][0] == pytest.approx(results["plain"][0], rel=1e-5)
    torch.testing.assert_close(results["slm"][1], results["plain"][1], rtol=1e-4, atol=1e-5)


def test_selective_trainer_loss_is_selective_loss(stores, corpus_scores, reference_model, tmp_path):
    ds = windows_dataset(stores["corpus"], SEQ_LEN)[:8]
    collator = SelectiveCollator(stores["corpus"].tokenizer(), scores=corpus_scores)
    batch = collator(ds)
    assert torch.isnan(batch["ref_loss"][:, 0]).all() and torch.isfinite(batch["ref_loss"][:, 1:]).all()
    model = load_model(str(reference_model))
    trainer = SelectiveTrainer(model=model, args=_args(tmp_path), train_dataset=ds, data_collator=collator, ratio=0.4)
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"]).logits
    expected = selective_loss(logits[:, :-1], batch["labels"][:, 1:], batch["ref_loss"][:, 1:], ratio=0.4)
    torch.testing.assert_close(loss, expected.loss)
    assert trainer.selection_stats["frac_selected"] == pytest.approx(0.4, abs=0.01)
    # online reference: the same model run inside compute_loss selects the same tokens as its ScoreStore
    online = SelectiveTrainer(model=model, args=_args(tmp_path), train_dataset=ds, data_collator=SelectiveCollator(
        stores["corpus"].tokenizer()), ratio=0.4, reference_model=load_model(str(reference_model)))
    online_batch = {k: v for k, v in batch.items() if k != "ref_loss"}
    torch.testing.assert_close(online.compute_loss(model, online_batch), expected.loss)
    # examples that are not the scored corpus are refused
    bad = [{"input_ids": [1, 2, 3, 4], "offset": 0}]
    with pytest.raises(ValueError, match="does not match the tokens the scores were computed on"):
        collator(bad)


def test_selective_trainer_on_sft_data_never_selects_prompt_tokens(stores, reference_model, tmp_path):
    tok = stores["heldout"].tokenizer()
    rows = [json.loads(line) for line in (Path(stores["heldout"].manifest["sources"][0])).read_text().splitlines()]
    examples = []
    for r in rows[:16]:
        prompt = tok(f"Question: {r['question']}\nAnswer:").input_ids
        answer = tok(" " + r["answer"]).input_ids + [tok.eos_token_id]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    model = load_model(str(reference_model))
    trainer = SelectiveTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=examples,
                               data_collator=SelectiveCollator(tok), ratio=0.5,
                               reference_model=load_model(str(reference_model)))
    batch = SelectiveCollator(tok)(examples[:4])
    trainer.compute_loss(model, dict(batch))
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    assert trainer.selection_stats["frac_selected"] == pytest.approx(round(0.5 * n_answer) / n_answer)
    trainer.train()
    assert len(_losses(trainer)) == 2 and all(np.isfinite(_losses(trainer)))


@pytest.mark.parametrize("ratio", [1.0, 0.6])
def test_selective_trainer_with_two_processes(stores, corpus_scores, reference_model, tmp_path, ratio):
    """torchrun, gloo: 2 processes x batch 2 with accumulation 2 see the windows of 1 process x batch 4 with
    accumulation 2. At ratio 1 the two are the same run (the loss is normalised over the whole step on both
    processes); below 1 each process selects within its own micro-batch, so they differ a little."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for nproc, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"p{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(HERE / "hf_trainer_worker.py"), str(stores["corpus"].path), str(corpus_scores.path),
               str(reference_model), str(out), str(batch), str(ratio)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[nproc] = json.loads((out / "losses.json").read_text())
    assert len(losses[2]) == 3 and all(np.isfinite(losses[2]))
    assert losses[2] == pytest.approx(losses[1], rel=1e-4 if ratio == 1.0 else 0.05)


def test_lm_eval_reads_a_rho1_checkpoint(reference_model, data_dir, tmp_path):
    """lm-evaluation-harness's `hf` model on a rho1 checkpoint, with a local YAML task over a local jsonl (a
    two-choice final answer): its accuracy equals the one computed here from the same log-likelihoods."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from rho1.data.tokenizer import load_tokenizer
    from rho1.eval.accuracy import extract_answer

    rows = []
    for line in data_dir["heldout"].read_text().splitlines()[:12]:
        r = json.loads(line)
        gold = extract_answer(r["answer"])
        rows.append({"question": r["question"], "choices": [gold, str(int(float(gold)) + 1)], "label": 0})
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "rho1_qa.yaml").write_text(f"""task: rho1_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "tasks" / "qa.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer: The answer is"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    results = simple_evaluate(model="hf", model_args=f"pretrained={reference_model},dtype=float32", tasks=["rho1_qa"],
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu",
                              batch_size=4)
    acc = results["results"]["rho1_qa"]["acc,none"]
    model, tok = load_model(str(reference_model)).eval(), load_tokenizer(str(reference_model))

    def loglikelihood(context, continuation):
        ctx, whole = tok(context).input_ids, tok(context + continuation).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))

    correct = 0
    for r in rows:
        context = f"Question: {r['question']}\nAnswer: The answer is"
        lls = [loglikelihood(context, " " + c) for c in r["choices"]]
        correct += lls[0] > lls[1]
    assert acc == pytest.approx(correct / len(rows))


def test_a_moving_average_reference_of_a_bf16_model_is_kept_in_float32(stores, reference_model, tmp_path):
    """In bf16 a step of 1 - DECAY = 1% towards the learner mostly rounds away; the reference is held in float32 (as
    `rho1 train` holds it) and moves by exactly ref.lerp(learner, 1 - DECAY) after each optimizer step."""
    ds = windows_dataset(stores["corpus"], SEQ_LEN)[:8]
    model = load_model(str(reference_model), dtype=torch.bfloat16)
    trainer = SelectiveTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=ds,
                               data_collator=SelectiveCollator(stores["corpus"].tokenizer()), reference_model="self",
                               reference_ema=0.99, ratio=0.5)
    start = [p.detach().float().clone() for p in trainer.reference_model.parameters()]
    assert {p.dtype for p in trainer.reference_model.parameters()} == {torch.float32}
    trainer.train()
    learner = [p.detach() for p in model.parameters()]
    assert any(not torch.equal(s, p.float()) for s, p in zip(start, learner))
    for s, p, ref in zip(start, learner, trainer.reference_model.parameters()):
        torch.testing.assert_close(ref, s.lerp(p.float(), 1 - 0.99), rtol=0, atol=0)


def test_a_self_reference_lives_in_its_checkpoint_and_rotates_with_it(stores, reference_model, tmp_path):
    """Trainer keeps the newest save_total_limit checkpoints: each kept one holds the reference of its own step, a
    rotated one goes whole (no reference.safetensors left behind, none beside the checkpoints)."""
    from safetensors.torch import load_file

    ds = windows_dataset(stores["corpus"], SEQ_LEN)[:16]
    model = load_model(str(reference_model))
    trainer = SelectiveTrainer(model=model, args=_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1,
                                                       save_total_limit=2),
                               train_dataset=ds, data_collator=SelectiveCollator(stores["corpus"].tokenizer()),
                               reference_model="self", reference_ema=0.5, ratio=0.5)
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert not list(tmp_path.glob("reference.safetensors"))
    at3, at4 = (load_file(tmp_path / f"checkpoint-{s}" / "reference.safetensors") for s in (3, 4))
    final = trainer.reference_model.state_dict()
    assert any(not torch.equal(at3[k], at4[k]) for k in at3)  # each holds its own step's moving average
    assert at4.keys() <= final.keys() and all(torch.equal(at4[k], final[k]) for k in at4)
