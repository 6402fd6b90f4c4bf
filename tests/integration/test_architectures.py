"""Any Hugging Face causal LM, as it is: tiny randomly initialised models of 17 architectures,
saved with save_pretrained beside the store's tokenizer, each through score, train on both loss paths, eval,
SelectiveTrainer, export and from_pretrained of RUN/final. Learned (GPT-2, OPT, GPT-BigCode), rotary (Llama,
GPT-NeoX, GPT-J...), ALiBi (Bloom, MPT) and sinusoidal (XGLM) positions; tied and untied heads; heads with a
bias (Phi, GPT-J), soft-capping (Gemma 2) and logit scaling (Cohere, Granite); multi-query attention (Falcon,
GPT-BigCode) and grouped queries (Qwen2, Starcoder2); a state-space model (Mamba)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from rho1.config import EvalConfig, ExportConfig, ScoreConfig, TrainConfig
from rho1.data.loader import make_batch
from rho1.evaluate import evaluate_model
from rho1.export import export
from rho1.head import head_is_linear
from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
from rho1.model import load_model
from rho1.score import score
from rho1.train import fit, setup

SEQ = 32
LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
GPT = dict(n_embd=32, n_layer=2, n_head=2)
# architecture: (config options, the loss path rho1 must pick, the dtype the model is saved in)
ARCHITECTURES = {
    "llama": (LAYERS, "chunked", torch.float32),
    "qwen2": ({**LAYERS, "num_key_value_heads": 1}, "chunked", torch.bfloat16),
    "gemma2": ({**LAYERS, "num_key_value_heads": 1, "head_dim": 16, "final_logit_softcapping": 30.0}, "logits",
               torch.float32),
    "cohere": ({**LAYERS, "logit_scale": 0.5}, "logits", torch.float32),
    "granite": ({**LAYERS, "logits_scaling": 2.0}, "logits", torch.float32),
    "phi": (LAYERS, "logits", torch.float32),
    "gpt_neox": (LAYERS, "chunked", torch.float16),
    "starcoder2": ({**LAYERS, "num_key_value_heads": 1}, "chunked", torch.float32),
    "falcon": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, multi_query=True,
                    new_decoder_architecture=False), "chunked", torch.float32),
    "gpt2": (GPT, "chunked", torch.float32),
    "gpt_bigcode": ({**GPT, "multi_query": True}, "chunked", torch.float32),
    "gptj": ({**GPT, "rotary_dim": 8}, "logits", torch.float32),
    "opt": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32),
            "chunked", torch.float32),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=2), "chunked", torch.bfloat16),
    "mpt": (dict(d_model=32, n_layers=2, n_heads=2, expansion_ratio=2), "chunked", torch.float32),
    "mamba": (dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2), "chunked", torch.float32),
    "xglm": (dict(d_model=32, num_layers=2, attention_heads=2, ffn_dim=64), "chunked", torch.float32),
}


def tiny_model(arch: str, store, path, dtype=torch.float32, seed: int = 0):
    """A randomly initialised model of ``arch`` for the store's tokenizer, saved with save_pretrained."""
    options = ARCHITECTURES[arch][0]
    eos = store.manifest["eos_token_id"]
    config = AutoConfig.for_model(arch, vocab_size=store.vocab_size, eos_token_id=eos, bos_token_id=eos,
                                  pad_token_id=store.tokenizer().pad_token_id, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    store.tokenizer().save_pretrained(path)
    return path


def plain_losses(model, store, windows) -> torch.Tensor:
    """Per-token losses of a plain forward (full logits, no rho1 code between the model and the loss)."""
    batch = make_batch(store, np.asarray(windows), SEQ)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits.float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), reduction="none",
                             ignore_index=-100).view_as(batch.labels)
    return losses, batch.labels != -100, batch.positions


def _train(store, scores, model, out, loss_impl):
    cfg = TrainConfig(data=str(store.path), scores=str(scores), model=str(model), out=str(out), objective="slm",
                      ratio=0.6, seq_len=SEQ, batch_size=4, max_tokens=2 * 4 * SEQ, warmup_steps=1, lr=1e-3,
                      loss_impl=loss_impl, eval_data=[str(store.path)], eval_max_windows=4)
    run = setup(cfg, progress=False)
    summary = fit(run, progress=False)
    return run, summary


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_stage_takes_the_architecture_as_it_is(arch, stores, tmp_path):
    _, path_expected, dtype = ARCHITECTURES[arch]
    store = stores["heldout"]
    model_dir = tiny_model(arch, store, tmp_path / "model", dtype)
    # another initialisation as the reference: against the model itself every excess loss would be ~0, ranked by
    # float16 rounding
    reference_dir = tiny_model(arch, store, tmp_path / "reference", seed=1)

    # score: the stored losses are a plain forward's (to float16), whatever the positions
    scores = score(ScoreConfig(str(store.path), str(reference_dir), str(tmp_path / "scores"), SEQ, batch_size=8),
                   progress=False)
    reference = load_model(str(reference_dir))
    assert head_is_linear(reference, torch.as_tensor(store.tokens[:16].astype(np.int64))[None]) == (
        path_expected == "chunked")
    losses, valid, positions = plain_losses(reference, store, [0, 1, 2])
    stored = np.asarray(scores.scores, np.float32)[positions[valid].numpy()]
    np.testing.assert_allclose(stored, losses[valid].half().float().numpy(), rtol=1e-3, atol=1e-3)

    # train on both loss paths: the same first step; the path rho1 picks is the one the head allows
    run, summary = _train(store, scores.path, model_dir, tmp_path / "auto", "auto")
    _, logits_summary = _train(store, scores.path, model_dir, tmp_path / "logits", "logits")
    assert summary["loss_path"] == path_expected and logits_summary["loss_path"] == "logits"
    first = [next(r for r in read_metrics(tmp_path / d) if r["kind"] == "train") for d in ("auto", "logits")]
    assert first[0]["selected"] == first[1]["selected"] > 0
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    assert summary["saved_dtype"] == str(dtype).removeprefix("torch.")

    # from_pretrained of RUN/final: the same class, every weight the trained model's, ties kept, the dtype it came in
    final = tmp_path / "auto" / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
    trained = run.accelerator.unwrap_model(run.model)
    assert type(loaded) is type(trained) and loaded.dtype == dtype
    assert json.loads((final / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(dtype)), name
    tied = trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    with safe_open(final / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}

    # eval: the losses of a plain forward of the final model
    results = evaluate_model(EvalConfig(model=str(final), data=[str(store.path)], seq_len=SEQ), progress=False)
    final_model = load_model(str(final))
    n = store.num_windows(SEQ)
    plain, valid, _ = plain_losses(final_model, store, range(n))
    assert results[store.path.name]["loss"] == pytest.approx(float(plain[valid].mean()), rel=1e-5)

    # SelectiveTrainer, with the reference online
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = SelectiveTrainer(model=load_model(str(model_dir)), args=args, train_dataset=windows_dataset(store, SEQ),
                               data_collator=SelectiveCollator(store.tokenizer()), reference_model=reference,
                               ratio=0.6)
    trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(trainer.state.log_history[0]["loss"])
    assert trainer.selection_stats["frac_selected"] == pytest.approx(0.6, abs=0.02)

    # export: the rule's share of every window's tokens, as labels
    manifest = export(ExportConfig(data=str(store.path), scores=str(scores.path), model=str(model_dir),
                                   out=str(tmp_path / "export"), seq_len=SEQ), progress=False)
    assert manifest["frac_selected"] == pytest.approx(0.6, abs=0.01)


# ---- what a model cannot take is one sentence, in every stage ----

def test_a_saved_tokenizer_loads_as_it_was_saved_beside_any_model_type(stores, tmp_path):
    from rho1.data.tokenizer import load_tokenizer, tokenizer_hash

    store = stores["heldout"]
    folder = tiny_model("qwen2", store, tmp_path / "qwen2")  # its model type maps to Qwen2Tokenizer
    loaded = load_tokenizer(folder)
    assert tokenizer_hash(loaded) == store.tokenizer_hash
    text = "cafe\u0301 and caf\u00e9"  # a combining accent: NFC normalisation would change the ids
    assert loaded(text)["input_ids"] == store.tokenizer()(text)["input_ids"]


def test_windows_longer_than_the_positions_are_refused_in_eval_and_selective_trainer(stores, tmp_path, capsys):
    from rho1.cli import main

    store = stores["heldout"]
    gpt2 = tmp_path / "gpt2"
    config = AutoConfig.for_model("gpt2", vocab_size=store.vocab_size, n_positions=16, **GPT)
    AutoModelForCausalLM.from_config(config).save_pretrained(gpt2)
    store.tokenizer().save_pretrained(gpt2)
    assert main(["eval", "--model", str(gpt2), "--data", str(store.path), "--seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-len 32 is longer than model" in err[0] and "(16 positions)" in err[0], err
    assert main(["score", "--model", str(gpt2), "--data", str(store.path), "--seq-len", "32", "--out",
                 str(tmp_path / "s")]) == 2
    assert "16 positions" in capsys.readouterr().err
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no")
    trainer = SelectiveTrainer(model=load_model(str(gpt2)), args=args, train_dataset=windows_dataset(store, 32)[:4],
                               data_collator=SelectiveCollator(store.tokenizer()), ratio=0.6, score="learner")
    with pytest.raises(ValueError, match="rows of 32 tokens but the model takes at most 16 positions"):
        trainer.train()


def test_selective_trainer_refuses_ids_beyond_the_vocabulary_of_the_model_or_the_reference(stores, tmp_path):
    store = stores["heldout"]
    small = AutoConfig.for_model("llama", vocab_size=100, **LAYERS)
    fits = tiny_model("llama", store, tmp_path / "llama")
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no")
    data = windows_dataset(store, SEQ)[:4]
    trainer = SelectiveTrainer(model=AutoModelForCausalLM.from_config(small), args=args, train_dataset=data,
                               data_collator=SelectiveCollator(store.tokenizer()), ratio=0.6, score="learner")
    with pytest.raises(ValueError, match=r"token id \d+ but the model has 100 token embeddings"):
        trainer.train()
    trainer = SelectiveTrainer(model=load_model(str(fits)), args=args, train_dataset=data,
                               data_collator=SelectiveCollator(store.tokenizer()), ratio=0.6,
                               reference_model=AutoModelForCausalLM.from_config(small))
    with pytest.raises(ValueError, match="the reference model has 100 token embeddings .*reference_tokenizer="):
        trainer.train()


def test_dropout_and_dtypes_are_said_when_the_run_starts(stores, tmp_path, capsys):
    from rho1.cli import main

    store = stores["heldout"]
    opt = tiny_model("opt", store, tmp_path / "opt", torch.bfloat16)
    assert main(["train", "--data", str(store.path), "--model", str(opt), "--seq-len", str(SEQ), "--batch-size", "2",
                 "--max-tokens", str(2 * SEQ), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "parameters in float32, saved in bfloat16" in printed
    assert "trains with dropout (" in printed and "dropout 0.1" in printed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropout"]["dropout"] == 0.1 and summary["saved_dtype"] == "bfloat16"


def test_the_score_progress_bar_reaches_its_total(stores, tmp_path, capfd, monkeypatch):
    import rho1.progress

    monkeypatch.setattr(rho1.progress, "LOG_INTERVAL", 0.0)
    store = stores["heldout"]
    model = tiny_model("llama", store, tmp_path / "llama")
    score(ScoreConfig(str(store.path), str(model), str(tmp_path / "s"), SEQ, chunk_windows=4096), progress=True)
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("score:")]
    assert lines and "100%" in lines[-1], lines
