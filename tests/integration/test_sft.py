"""SLM for supervised fine-tuning: the loss on the answer only (--train-on target), references that need no
training (--reference self, its moving average, a self-evolving copy), ranking over the whole dataset and
training on an export's labels. The SFT data is the reference store: GSM8K questions with their answers as
the target (--template, --target-field answer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MATH_TEMPLATE, SEQ_LEN, read_metrics
from safetensors.torch import load_file

from rho1.config import ExportConfig, TrainConfig
from rho1.data.loader import IGNORE_INDEX, WindowOrder
from rho1.head import reference_token_losses
from rho1.train import setup, train
from rho1.train.step import micro_step, step_batches


def _cfg(stores, out, **kw) -> TrainConfig:
    base = dict(data=str(stores["reference"].path), out=str(out), model_preset="nano", seq_len=SEQ_LEN, batch_size=4,
                max_tokens=4 * 4 * SEQ_LEN, warmup_steps=2, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def _train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_train_on_target_with_clm_is_the_plain_masked_loss(stores, tmp_path):
    """The first step's logged loss is the mean cross-entropy of the starting model over the answer tokens of the
    step's windows, computed here by hand from the store; every other token counts for nothing."""
    store = stores["reference"]
    cfg = _cfg(stores, tmp_path / "run", train_on="target", max_tokens=4 * SEQ_LEN)
    run = setup(cfg, progress=False)
    model = run.accelerator.unwrap_model(run.model)
    windows = WindowOrder(store.num_windows(SEQ_LEN), cfg.seed).take(0, 4)
    tokens = np.stack([np.asarray(store.tokens[w * SEQ_LEN:(w + 1) * SEQ_LEN], dtype=np.int64) for w in windows])
    target = np.stack([np.asarray(store.target_mask[w * SEQ_LEN + 1:(w + 1) * SEQ_LEN]) for w in windows]) > 0
    ids = torch.from_numpy(tokens)
    labels = torch.where(torch.from_numpy(target), ids[:, 1:], IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    assert 0 < target.sum() < target.size  # the windows hold prompts and answers: the mask matters
    from rho1.train.loop import fit

    fit(run, progress=False)
    first = _train_records(tmp_path / "run")[0]
    assert first["selected"] == int(target.sum())
    assert first["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("objective", ["clm", "slm"])
def test_prompt_tokens_are_never_selected_or_trained_on(stores, tmp_path, objective):
    store = stores["reference"]
    target = np.asarray(store.target_mask) > 0
    extra = dict(objective="slm", reference="self", ratio=0.5) if objective == "slm" else {}
    run = setup(_cfg(stores, tmp_path / "target", train_on="target", **extra), progress=False)
    prompts_seen = 0
    for step in range(3):
        for micro, batch in enumerate(step_batches(run, step)):
            selection, _ = micro_step(run, batch, step, micro)
            kept = selection.mask if selection.weights is None else selection.weights > 0
            positions = batch.positions[kept]
            assert len(positions) > 0 and target[positions.numpy()].all()
            labelled = batch.positions[batch.labels != IGNORE_INDEX].numpy()
            assert target[labelled].all()
    # without --train-on target the same windows do train on prompt tokens: the check above could fail
    run = setup(_cfg(stores, tmp_path / "all", **extra), progress=False)
    for step in range(3):
        for micro, batch in enumerate(step_batches(run, step)):
            selection, _ = micro_step(run, batch, step, micro)
            kept = selection.mask if selection.weights is None else selection.weights > 0
            prompts_seen += int((~target[batch.positions[kept].numpy()]).sum())
    assert prompts_seen > 0


def test_train_on_target_needs_target_tokens(stores, tmp_path):
    with pytest.raises(ValueError, match="--train-on target needs target tokens.*--template and --target-field"):
        train(_cfg(stores, tmp_path / "run", data=str(stores["corpus"].path), train_on="target"), progress=False)


def test_reference_self_at_the_first_step_uses_the_starting_models_losses(stores, tmp_path):
    cfg = _cfg(stores, tmp_path / "run", objective="slm", reference="self", ratio=0.5)
    assert cfg.score is None
    run = setup(cfg, progress=False)
    assert cfg.score == "retrospective"  # ssToken's score, named in RUN/config.yaml
    start = {k: v.clone() for k, v in run.accelerator.unwrap_model(run.model).state_dict().items()}
    batch = step_batches(run, 0)[0]
    learner = run.accelerator.unwrap_model(run.model)
    expected = reference_token_losses(learner.eval(), batch.input_ids, batch.labels, rounded=False)
    learner.train()
    assert torch.equal(torch.isnan(batch.ref_loss), batch.labels == IGNORE_INDEX)
    # at full precision (a self reference is never stored, so never rounded to float16 as a ScoreStore is)
    assert torch.allclose(batch.ref_loss.nan_to_num(), expected.nan_to_num(), atol=1e-6)
    assert not torch.equal(batch.ref_loss.nan_to_num(), batch.ref_loss.half().float().nan_to_num())
    from rho1.train.loop import fit

    fit(run, progress=False)
    # without --reference-ema or --reference-update the reference stays the starting model
    for name, tensor in run.reference[0].state_dict().items():
        assert torch.equal(tensor, start[name]), name
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert any(not torch.equal(final[k], start[k]) for k in final)  # while the learner moved


def _weights(path: Path) -> dict:
    return load_file(path)


def test_self_evolving_reference_swaps_every_n_steps_and_resumes_bitwise(stores, tmp_path):
    """--reference-update 3 over 7 steps: the reference is the starting model for steps 1-3, the learner after step
    3 for steps 4-6, the learner after step 6 for step 7; a run killed after its checkpoint at step 4 and resumed
    ends bit for bit as the uninterrupted one."""
    step_tokens = 4 * SEQ_LEN
    kw = dict(objective="slm", reference="self", reference_update=3, ratio=0.5, max_tokens=7 * step_tokens,
              save_every=step_tokens, keep_last=0)
    whole = tmp_path / "whole"
    train(_cfg(stores, whole, **kw), progress=False)
    ckpt = {s: whole / "checkpoints" / str(s * step_tokens) for s in range(1, 7)}
    ref = {s: _weights(ckpt[s] / "reference.safetensors") for s in ckpt}
    model = {s: _weights(ckpt[s] / "model.safetensors") for s in ckpt}

    def same(a, b):
        common = a.keys() & b.keys()
        return bool(common) and all(torch.equal(a[k], b[k]) for k in common)

    assert same(ref[1], ref[2]) and not same(ref[2], ref[3])
    assert same(ref[3], model[3]) and same(ref[4], model[3]) and same(ref[5], model[3])
    assert not same(ref[5], model[5]) and same(ref[6], model[6])

    killed = tmp_path / "killed"  # what a kill right after the checkpoint at step 4 leaves
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt[4], killed / "checkpoints" / ckpt[4].name)
    shutil.copy(whole / "config.yaml", killed / "config.yaml")
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(whole)
                                                  if r["step"] <= 4))
    train(_cfg(stores, killed, resume=True, **kw), progress=False)
    assert (killed / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    timing = ("tokens_per_second", "tokens_per_second_per_process", "mfu")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_metrics(killed)) == strip(read_metrics(whole))


def test_ema_reference_moves_towards_the_learner_and_resumes_bitwise(stores, tmp_path):
    step_tokens = 4 * SEQ_LEN
    kw = dict(objective="slm", reference="self", reference_ema=0.5, ratio=0.5, max_tokens=4 * step_tokens,
              save_every=step_tokens, keep_last=0)
    whole = tmp_path / "whole"
    train(_cfg(stores, whole, **kw), progress=False)
    one, two = (whole / "checkpoints" / str(s * step_tokens) for s in (1, 2))
    ref1, ref2 = _weights(one / "reference.safetensors"), _weights(two / "reference.safetensors")
    learner2 = _weights(two / "model.safetensors")
    for name in ref2.keys() & learner2.keys():  # ref2 = 0.5 ref1 + 0.5 learner2
        assert torch.allclose(ref2[name], 0.5 * ref1[name] + 0.5 * learner2[name], atol=1e-6), name
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two, killed / "checkpoints" / two.name)
    shutil.copy(whole / "config.yaml", killed / "config.yaml")
    train(_cfg(stores, killed, resume=True, **kw), progress=False)
    assert (killed / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()


def test_self_reference_options_are_checked_in_one_sentence(stores, tmp_path):
    with pytest.raises(ValueError, match="--reference-ema and --reference-update apply to --reference self"):
        _cfg(stores, tmp_path, reference_update=3).check()
    with pytest.raises(ValueError, match="--reference-ema must be a decay in"):
        _cfg(stores, tmp_path, objective="slm", reference="self", reference_ema=1.5).check()
    with pytest.raises(ValueError, match="not both"):
        _cfg(stores, tmp_path, objective="slm", reference="self", reference_ema=0.9, reference_update=2).check()


def _export(stores, reference_model, corpus_scores_path, out, **kw):
    from rho1.export import export

    return export(ExportConfig(data=str(stores["reference"].path), scores=corpus_scores_path,
                               model=str(reference_model), out=str(out), seq_len=SEQ_LEN, batch_size=4, **kw),
                  progress=False)


@pytest.fixture(scope="module")
def sft_scores(stores, reference_model, tmp_path_factory):
    """Reference losses of the SFT store (the reference model scores its own training data here: a stand-in)."""
    from rho1.score import ScoreConfig, score

    out = tmp_path_factory.mktemp("sft") / "scores"
    return score(ScoreConfig(str(stores["reference"].path), str(reference_model), str(out), SEQ_LEN, batch_size=16),
                 progress=False)


def _export_rows(out: Path):
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, pq.read_table([str(out / s) for s in manifest["shards"]]).to_pylist()


def test_dataset_scope_keeps_exactly_the_top_ratio_of_the_whole_store(stores, reference_model, sft_scores, tmp_path):
    from rho1.head import linear_head_of, token_losses
    from rho1.model import load_model
    from rho1.selection import num_selected

    store = stores["reference"]
    _export(stores, reference_model, str(sft_scores.path), tmp_path / "global", ratio=0.3, selection_scope="dataset")
    manifest, rows = _export_rows(tmp_path / "global")
    kept = np.zeros(store.n_tokens, dtype=bool)
    for row in rows:  # every window's first token is its offset: a label at t is the token at offset + t
        assert row["input_ids"] == list(np.asarray(store.tokens[row["offset"]:row["offset"] + len(row["input_ids"])]))
        labels = np.asarray(row["labels"])
        kept[row["offset"] + np.flatnonzero(labels != IGNORE_INDEX)] = True
    model = load_model(str(reference_model))
    losses = token_losses(model, store, SEQ_LEN, 16, head_of=linear_head_of(model, store, SEQ_LEN))
    excess = losses - np.asarray(sft_scores.scores, np.float32)
    valid = np.isfinite(excess)
    assert kept.sum() == num_selected(int(valid.sum()), 0.3) == manifest["tokens_with_a_label"]
    assert excess[kept].min() >= excess[valid & ~kept].max() - 1e-6  # the top of the whole store, not of each group
    _export(stores, reference_model, str(sft_scores.path), tmp_path / "group", ratio=0.3)
    group = _export_rows(tmp_path / "group")[1]
    group_kept = np.zeros(store.n_tokens, dtype=bool)
    for row in group:
        group_kept[row["offset"] + np.flatnonzero(np.asarray(row["labels"]) != IGNORE_INDEX)] = True
    assert not np.array_equal(group_kept, kept)  # per-group ranking keeps other tokens


@pytest.mark.parametrize("scope", ["group", "dataset"])
def test_export_with_train_on_target_never_labels_a_prompt_token(stores, reference_model, sft_scores, tmp_path, scope):
    store = stores["reference"]
    target = np.asarray(store.target_mask) > 0
    out = tmp_path / "export"
    _export(stores, reference_model, str(sft_scores.path), out, ratio=0.5, selection_scope=scope, train_on="target")
    labelled = 0
    manifest, rows = _export_rows(out)
    for row in rows:
        at = row["offset"] + np.flatnonzero(np.asarray(row["labels"]) != IGNORE_INDEX)
        assert target[at].all()
        labelled += len(at)
    assert labelled > 0 and manifest["valid_tokens"] < target.sum()  # only answer tokens were ranked
    if scope == "dataset":  # exactly the top half of the store's answer tokens
        from rho1.selection import num_selected

        assert labelled == num_selected(manifest["valid_tokens"], 0.5)


def test_train_on_an_exports_labels_trains_on_exactly_those_tokens(stores, reference_model, sft_scores, tmp_path):
    out = tmp_path / "export"
    _export(stores, reference_model, str(sft_scores.path), out, ratio=0.4, selection_scope="dataset")
    manifest, rows = _export_rows(out)
    by_offset = {r["offset"]: np.asarray(r["labels"]) for r in rows}
    cfg = _cfg(stores, tmp_path / "run", selection=str(out), max_tokens=2 * 4 * SEQ_LEN)
    run = setup(cfg, progress=False)
    for step in range(2):
        windows = run.order.take(step * run.windows_per_step, run.windows_per_step)
        for batch in step_batches(run, step):
            for b in range(batch.input_ids.shape[0]):
                labels = by_offset[int(windows[b]) * SEQ_LEN]
                expected = labels[1:] != IGNORE_INDEX  # export labels are unshifted; ours are the next token
                assert np.array_equal((batch.labels[b, : len(expected)] != IGNORE_INDEX).numpy(), expected)
    from rho1.train.loop import fit

    fit(run, progress=False)
    records = _train_records(tmp_path / "run")
    assert 0 < records[0]["selected"] < 4 * (SEQ_LEN - 1)


def test_train_on_an_export_of_another_store_is_refused(stores, reference_model, sft_scores, tmp_path):
    out = tmp_path / "export"
    _export(stores, reference_model, str(sft_scores.path), out, ratio=0.4)
    with pytest.raises(ValueError, match="was made from another TokenStore"):
        train(_cfg(stores, tmp_path / "run", data=str(stores["heldout"].path), selection=str(out)), progress=False)
    with pytest.raises(ValueError, match="windows of 64 tokens"):
        train(_cfg(stores, tmp_path / "run2", selection=str(out), seq_len=32), progress=False)


def test_score_and_eval_with_train_on_target_count_answer_tokens_only(stores, reference_model, sft_scores, tmp_path):
    from rho1.config import EvalConfig
    from rho1.evaluate import evaluate_model
    from rho1.score import ScoreConfig, score

    store = stores["reference"]
    target = np.asarray(store.target_mask) > 0
    scored = score(ScoreConfig(str(store.path), str(reference_model), str(tmp_path / "scores"), SEQ_LEN,
                               batch_size=16, train_on="target"), progress=False)
    values, everything = np.asarray(scored.scores, np.float32), np.asarray(sft_scores.scores, np.float32)
    assert np.isnan(values[~target]).all() and np.isfinite(values[target]).sum() > 0
    assert np.array_equal(values[target], everything[target], equal_nan=True)
    assert scored.manifest["train_on"] == "target"
    kw = dict(model=str(reference_model), data=[str(store.path)], scores=[str(sft_scores.path)], seq_len=SEQ_LEN)
    on_target = evaluate_model(EvalConfig(train_on="target", **kw), progress=False)[store.path.name]
    on_all = evaluate_model(EvalConfig(**kw), progress=False)[store.path.name]
    assert on_target["loss"] == pytest.approx(on_target["target_loss"]) == pytest.approx(on_all["target_loss"])
    assert on_target["tokens"] < on_all["tokens"] and on_all["loss"] != pytest.approx(on_all["target_loss"])


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _conversations(data_dir, path: Path) -> list[dict]:
    problems = [json.loads(line) for line in data_dir["heldout"].read_text().splitlines()[:12]]
    records = [{"messages": [{"role": "system", "content": "Solve the problem."},
                             {"role": "user", "content": p["question"]},
                             {"role": "assistant", "content": p["answer"]}]} for p in problems[:10]]
    a, b = problems[10:12]  # two turns: both answers are the target, both questions are not
    records.append({"messages": [{"role": "user", "content": a["question"]}, {"role": "assistant", "content": a["answer"]},
                                 {"role": "user", "content": b["question"]}, {"role": "assistant", "content": b["answer"]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_chat_field_makes_the_assistant_turns_the_target(stores, data_dir, tmp_path):
    from rho1.data.prepare import PrepareConfig, prepare

    tokenizer = stores["reference"].tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    records = _conversations(data_dir, tmp_path / "chat.jsonl")
    store = prepare(PrepareConfig([str(tmp_path / "chat.jsonl")], str(tmp_path / "store"),
                                  tokenizer=str(tmp_path / "chat-tokenizer"), chat_field="messages"), progress=False)
    tokens, mask, offsets = np.asarray(store.tokens), np.asarray(store.target_mask), store.doc_offsets
    for i, record in enumerate(records):
        ids, target = tokens[offsets[i]:offsets[i + 1] - 1], mask[offsets[i]:offsets[i + 1] - 1] > 0
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        questions = [m["content"] for m in record["messages"] if m["role"] != "assistant"]
        trained = tokenizer.decode(ids[target])
        assert trained == "".join(f"{a}<|end|>\n" for a in answers), i  # the answers and their end-of-turn markers
        prompt = tokenizer.decode(ids[~target])
        assert all(q in prompt for q in questions) and not any(a in prompt for a in answers)
        assert mask[offsets[i + 1] - 1] == 1  # the closing EOS follows an answer
    assert store.manifest["chat_field"] == "messages"


def test_chat_field_with_a_tokenizer_without_chat_template_is_one_sentence(stores, data_dir, tmp_path, capsys):
    from rho1.cli import main

    _conversations(data_dir, tmp_path / "chat.jsonl")
    rc = main(["prepare", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "store"), "--tokenizer",
               str(stores["reference"].path), "--chat-field", "messages"])
    err = capsys.readouterr().err
    assert rc == 2 and "this tokenizer has none" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


def test_resume_with_an_export_made_again_is_refused(stores, reference_model, sft_scores, tmp_path):
    out = tmp_path / "export"
    _export(stores, reference_model, str(sft_scores.path), out, ratio=0.4)
    kw = dict(selection=str(out), max_tokens=4 * 4 * SEQ_LEN, save_every=4 * SEQ_LEN)
    run = setup(_cfg(stores, tmp_path / "run", **kw), progress=False)
    from rho1.train.loop import fit

    fit(run, progress=False)
    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(out)
    _export(stores, reference_model, str(sft_scores.path), out, ratio=0.7)  # same path, another selection
    with pytest.raises(ValueError, match="the export of --selection"):
        train(_cfg(stores, tmp_path / "run", resume=True, **kw), progress=False)


def test_chat_templates_that_refuse_or_rewrite_a_conversation_are_one_sentence(stores, data_dir, tmp_path):
    from rho1.data.prepare import PrepareConfig, prepare

    _conversations(data_dir, tmp_path / "chat.jsonl")
    tokenizer = stores["reference"].tokenizer()
    cases = {  # a template that rejects a system role; one that drops earlier answers once another follows
        "refused": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                    "{% endif %}{{ m['content'] }}{% endfor %}", "the chat template refused this conversation"),
        "rewritten": ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|>"
                      "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                      "{% endif %}", "does not write this conversation turn by turn"),
    }
    for name, (template, message) in cases.items():
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
        if name == "rewritten":  # only the two-turn record trips it
            (tmp_path / "chat.jsonl").write_text((tmp_path / "chat.jsonl").read_text().splitlines()[-1] + "\n")
        with pytest.raises(ValueError, match=message):
            prepare(PrepareConfig([str(tmp_path / "chat.jsonl")], str(tmp_path / f"store-{name}"),
                                  tokenizer=str(tmp_path / name), chat_field="messages"), progress=False)
        assert not (tmp_path / f"store-{name}").exists()


def test_chats_without_an_answer_are_counted_and_a_store_of_none_is_refused(stores, data_dir, tmp_path, capsys):
    from rho1.cli import main

    tokenizer = stores["reference"].tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "chat-tokenizer")
    records = _conversations(data_dir, tmp_path / "chat.jsonl")
    unanswered = [{"messages": [m for m in r["messages"] if m["role"] != "assistant"]} for r in records]
    args = ["--tokenizer", str(tmp_path / "chat-tokenizer"), "--chat-field", "messages"]
    (tmp_path / "some.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:8] + unanswered[8:]))
    assert main(["prepare", str(tmp_path / "some.jsonl"), "--out", str(tmp_path / "some"), *args]) == 0
    assert "3 of 11 chats have no assistant turn" in capsys.readouterr().out
    assert json.loads((tmp_path / "some" / "manifest.json").read_text())["chats_without_answer"] == 3
    only_system = [{"messages": [{"role": "system", "content": "Solve the problem."}]}]
    for name, rows in (("none", unanswered), ("system", only_system)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["prepare", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / name), *args]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("prepare:")]
        assert len(err) == 1 and f"none of the {len(rows)} chats in --chat-field 'messages' has an assistant " \
            "turn" in err[0], err
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


def test_sft_misuses_are_one_sentence(stores, reference_model, sft_scores, data_dir, tmp_path, capsys):
    from rho1.cli import main
    from rho1.data.prepare import PrepareConfig, prepare

    def refused(args, *needles):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(n in err[0] for n in needles), err

    # a self reference only selects: clm trains on every token, so it would run for nothing
    refused(["train", "--data", str(stores["reference"].path), "--reference", "self", "--out", str(tmp_path / "r")],
            "--reference self scores tokens for selection, which --objective clm does not do")
    refused(["score", "--data", str(stores["reference"].path), "--model", "self", "--out", str(tmp_path / "s")],
            "--model self is a reference of `rho1 train --reference self` only")
    # a store prepared again since the export: said as such, not "another TokenStore (X), not X"
    store = shutil.copytree(stores["reference"].path, tmp_path / "store")  # same content: the scores fit it
    out = tmp_path / "export"
    assert main(["export", "--data", str(store), "--model", str(reference_model), "--scores", str(sft_scores.path),
                 "--seq-len", str(SEQ_LEN), "--out", str(out)]) == 0
    capsys.readouterr()
    prepare(PrepareConfig([str(data_dir["heldout"])], str(store), tokenizer=str(stores["reference"].path),
                          template=MATH_TEMPLATE, target_field="answer", overwrite=True), progress=False)
    refused(["train", "--data", str(store), "--selection", str(out), "--seq-len", str(SEQ_LEN), "--out",
             str(tmp_path / "t")], f"the TokenStore {store} was prepared again since --selection {out} was exported")
