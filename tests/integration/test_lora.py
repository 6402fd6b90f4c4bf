"""LoRA (--use-peft) with the reference riding on the learner's base: the adapters-off reference is the base, a
moving-average reference is a second adapter that moves as an EMA by hand, no frozen weight is held twice,
checkpoints hold the adapters and resume bitwise, the final folder is base + adapter merged, under DDP as in one
process; SelectiveTrainer does the same with a PeftModel."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SEQ_LEN, read_metrics
from safetensors.torch import load_file

from rho1.cli import main
from rho1.train import TrainConfig, setup, train
from rho1.train.reference import after_step
from rho1.train.step import step_batches, train_step

pytest.importorskip("peft")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _cfg(stores, reference_model, out, **kw) -> TrainConfig:
    base = dict(data=str(stores["corpus"].path), out=str(out), model=str(reference_model), use_peft=True, lora_r=4,
                lora_alpha=8.0, lora_dropout=0.0, objective="slm", reference="self", seq_len=SEQ_LEN, batch_size=4,
                max_tokens=4 * 4 * SEQ_LEN, lr=1e-2, warmup_steps=1)
    return TrainConfig(**{**base, **kw})


def test_the_adapters_off_reference_is_the_base_model(stores, reference_model, tmp_path):
    from rho1.head import reference_token_losses
    from rho1.model import load_model

    run = setup(_cfg(stores, reference_model, tmp_path / "run"), progress=False)
    try:
        view, head = run.reference
        for p in run.model.parameters():  # the learner's adapters move away from zero
            if p.requires_grad:
                p.data.add_(0.05)
        batch = step_batches(run, 0)[0]
        flags = [p.requires_grad for p in run.model.parameters()]
        got = reference_token_losses(view, batch.input_ids, batch.labels, head, rounded=False)
        base = load_model(str(reference_model))
        want = reference_token_losses(base, batch.input_ids, batch.labels, base, rounded=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        learner = reference_token_losses(run.model, batch.input_ids, batch.labels, run.model, rounded=False)
        assert not torch.allclose(learner.nan_to_num(), want.nan_to_num())  # the learner itself is elsewhere now
        assert [p.requires_grad for p in run.model.parameters()] == flags and run.model.training
    finally:
        run.held.close()


def test_a_moving_average_reference_is_a_second_adapter_an_ema_by_hand(stores, reference_model, tmp_path):
    run = setup(_cfg(stores, reference_model, tmp_path / "run", reference_ema=0.5), progress=False)
    try:
        learner = run.accelerator.unwrap_model(run.model)
        params = dict(learner.named_parameters())
        pairs = [(n, n.replace(".default.", ".reference.")) for n in params if ".default." in n]
        assert pairs and all(params[r].dtype == torch.float32 and not params[r].requires_grad for _, r in pairs)
        expected = {r: params[d].detach().float().clone() for d, r in pairs}  # a copy of the adapter at the start
        for step in range(3):
            train_step(run, step)
            run.optimizer.zero_grad(set_to_none=True)
            run.step = step + 1
            after_step(run)
            for d, r in pairs:
                expected[r] = expected[r].lerp(params[d].detach().float(), 0.5)
                torch.testing.assert_close(params[r].detach(), expected[r], rtol=0, atol=0)
        # no frozen weight is held twice: the reference's weights are the learner's, but for its adapter
        view = run.reference[0]
        storages = [p.untyped_storage().data_ptr() for p in view.parameters()]
        assert len(storages) == len(set(storages)) == len(list(learner.parameters()))
        base = [p for n, p in learner.named_parameters() if "lora_" not in n]
        assert {p.untyped_storage().data_ptr() for p in base} <= set(storages)
    finally:
        run.held.close()


def test_checkpoints_hold_adapters_resume_bitwise_and_the_final_is_base_plus_adapter(stores, reference_model,
                                                                                      tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    step = 4 * SEQ_LEN
    kw = dict(max_tokens=6 * step, save_every=2 * step, keep_last=0, reference_ema=0.5, train_on="all")
    whole = tmp_path / "whole"
    train(_cfg(stores, reference_model, whole, **kw), progress=False)
    state = load_file(whole / "checkpoints" / str(2 * step) / "state" / "model.safetensors")
    assert state and all("lora_" in k for k in state) and any(".reference." in k for k in state)
    assert (whole / "checkpoints" / str(2 * step) / "adapter_model.safetensors").is_file()
    assert not (whole / "checkpoints" / str(2 * step) / "model.safetensors").exists()  # no frozen base
    # killed after its first checkpoint: resumed, it ends bitwise where the whole run did
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("final", "adapter", "summary.json"))
    shutil.rmtree(resumed / "checkpoints" / str(4 * step))
    assert train(_cfg(stores, reference_model, resumed, resume=True, **kw), progress=False)["steps"] == 6
    for name in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    # a plain transformers folder: the base with the adapter merged, as PEFT itself computes it
    final = AutoModelForCausalLM.from_pretrained(whole / "final")
    assert "quantization_config" not in json.loads((whole / "final" / "config.json").read_text())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(reference_model), whole / "adapter")
    ids = torch.tensor([list(range(5, 5 + SEQ_LEN))])
    torch.testing.assert_close(final(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((whole / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        reference_model.resolve())
    # and every stage takes the adapter folder as a model (its base loaded as recorded, the adapter merged)
    assert main(["eval", "--model", str(whole / "adapter"), "--data", str(stores["heldout"].path), "--seq-len",
                 str(SEQ_LEN)]) == 0


def test_lora_refusals_are_one_sentence(stores, reference_model, tmp_path, capsys):
    def refused(args, needle):
        assert main(["train", "--data", str(stores["corpus"].path), "--out", str(tmp_path / "r"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err

    refused(["--lora-r", "8"], "--lora-* and --load-in-4bit shape the adapters of --use-peft")
    refused(["--use-peft", "--load-in-4bit", "--model", str(reference_model)],
            "--load-in-4bit quantizes the base with bitsandbytes, which runs on a CUDA GPU")
    refused(["--use-peft", "--lora-target-modules", "no_such_proj", "--model", str(reference_model)],
            "--lora-target-modules no_such_proj")
    # an adapter made on another base
    other = tmp_path / "adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/else",
                                                           "peft_type": "LORA"}))
    refused(["--use-peft", "--model", str(reference_model), "--objective", "slm", "--reference", str(other)],
            "is an adapter trained on someone/else, not on the learner's --model")
    refused(["--use-peft", "--load-in-4bit", "--model", str(other)], "is a LoRA adapter folder, which rho1 merges")
    refused(["--use-peft", "--load-in-4bit", "--model-preset", "nano"], "a --model-preset is built fresh in float32")
    # FSDP and DeepSpeed are refused for every LoRA run, with or without a reference; DDP is not
    from accelerate import DistributedType

    from rho1.lora import check_lora_launch

    check_lora_launch(DistributedType.MULTI_CPU)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match=f"--use-peft runs on one process or under DDP, not under {sharded.value}"):
            check_lora_launch(sharded)


def test_lora_under_ddp_reproduces_one_process_with_twice_the_batch(stores, corpus_scores, reference_model, tmp_path):
    def args(out, batch):
        return ["train", "--data", str(stores["corpus"].path), "--out", str(out), "--model", str(reference_model),
                "--use-peft", "--lora-r", "4", "--lora-dropout", "0", "--objective", "slm", "--scores",
                str(corpus_scores.path), "--selection-scope", "global", "--seq-len", str(SEQ_LEN), "--batch-size",
                str(batch), "--max-tokens", "4096", "--lr", "1e-2", "--warmup-steps", "1"]

    config = str(ROOT / "configs" / "accelerate" / "ddp.yaml")
    for cmd in ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", "rho1",
                 *args(tmp_path / "ddp", 4)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "rho1",
                 *args(tmp_path / "one", 8)]):
        result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    losses = {n: [r["loss"] for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in ("ddp", "one")}
    assert len(losses["one"]) == 8 and losses["ddp"] == pytest.approx(losses["one"], rel=1e-4)


def test_selective_trainer_on_a_peft_model_keeps_no_second_copy(stores, reference_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
    from rho1.lora import AdapterView
    from rho1.model import load_model

    model = get_peft_model(load_model(str(reference_model)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=3, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2)
    trainer = SelectiveTrainer(model=model, args=args, train_dataset=windows_dataset(stores["corpus"], SEQ_LEN)[:24],
                               data_collator=SelectiveCollator(stores["corpus"].tokenizer()), reference_model="self",
                               reference_ema=0.5, ratio=0.5)
    assert isinstance(trainer.reference_model, AdapterView)
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items() if ".reference." in n}
    trainer.train()
    moved = [n for n, p in params.items() if ".reference." in n and not torch.equal(p, start[n])]
    assert moved and all(not params[n].requires_grad for n in start)
    assert (tmp_path / "out" / "checkpoint-2" / "reference" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "checkpoint-2" / "reference.safetensors").exists()
