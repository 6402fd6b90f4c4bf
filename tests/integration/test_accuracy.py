"""Answer extraction and few-shot accuracy (`rho1 eval --answers`)."""

import json

import pytest
import torch
from conftest import data_file

from rho1.cli import main
from rho1.data.tokenizer import load_tokenizer
from rho1.eval.accuracy import AnswerConfig, answer_accuracy, extract_answer, few_shot_prompt, generate_answers
from rho1.model import load_model


def test_accuracy_equals_a_hand_count(reference_model, tmp_path):
    """Items whose gold answer is made to equal the model's own greedy answer count as correct, the others
    not: the accuracy from `rho1 eval --answers` equals that count, and the batched, left-padded generation
    equals a plain one-prompt-at-a-time greedy loop."""
    model, tok = load_model(str(reference_model)).eval(), load_tokenizer(str(reference_model))
    test = [json.loads(line) for line in data_file("gsm8k", "test.jsonl").read_text().splitlines()[:6]]
    exemplar = [json.loads(data_file("gsm8k", "train.jsonl").read_text().splitlines()[0])]
    prompts = [few_shot_prompt(r["question"], exemplar) for r in test]
    batched = generate_answers(model, tok, prompts, max_new_tokens=24, batch_size=4)
    for prompt, text in zip(prompts[:2], batched[:2]):  # greedy by hand, no padding
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        for _ in range(24):
            with torch.no_grad():
                nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt == tok.eos_token_id:
                break
        by_hand = tok.decode(ids[0, len(tok(prompt, add_special_tokens=False).input_ids):], skip_special_tokens=True)
        assert by_hand.split("\nQuestion:")[0].strip() == text
    answers = [extract_answer(t) for t in batched]
    assert sum(a is not None for a in answers) >= 3  # the model writes numbers
    rigged, expected_correct = [], 0
    for i, (record, answer) in enumerate(zip(test, answers)):
        make_right = i % 2 == 0 and answer is not None
        gold = answer if make_right else "987654321"
        expected_correct += make_right
        rigged.append({"question": record["question"], "answer": f"worked solution\n#### {gold}"})
    (tmp_path / "rigged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rigged))
    (tmp_path / "exemplar.jsonl").write_text(json.dumps(exemplar[0]) + "\n")
    out = tmp_path / "generations.jsonl"
    assert main(["eval", "--model", str(reference_model), "--answers", str(tmp_path / "rigged.jsonl"), "--shots", "1",
                 "--exemplars", str(tmp_path / "exemplar.jsonl"), "--max-new-tokens", "24", "--batch-size", "4",
                 "--generations", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["generation"] for r in rows] == batched
    assert sum(r["correct"] for r in rows) == expected_correct > 0
    result = answer_accuracy(model, tok, AnswerConfig(str(tmp_path / "rigged.jsonl"), 1, str(tmp_path / "exemplar.jsonl"),
                                                      max_new_tokens=24, batch_size=4))
    assert result["accuracy"] == pytest.approx(expected_correct / 6)
    assert 0 < result["gold_loss"] < 20


def test_missing_answer_field_is_refused(reference_model, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "2+2?", "solution": "4"}) + "\n")
    assert main(["eval", "--model", str(reference_model), "--answers", str(tmp_path / "bad.jsonl")]) == 2
    assert "has no field 'answer'" in capsys.readouterr().err
