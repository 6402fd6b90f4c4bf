"""Extracting the final answer of a worked solution."""


import json

import pytest
from conftest import data_file

from rho1.eval.accuracy import extract_answer


def test_every_gsm8k_gold_answer_extracts_to_itself():
    records = [json.loads(line) for name in ("train.jsonl", "test.jsonl")
               for line in data_file("gsm8k", name).read_text().splitlines()]
    assert len(records) == 650
    for r in records:
        gold = r["answer"].split("####")[-1].strip().replace(",", "")
        assert extract_answer(r["answer"]) == gold, r["answer"]


@pytest.mark.parametrize("text, expected", [
    ("so she makes $1,200.50 a day.\n#### 1,200.50", "1200.5"),
    ("The answer is 42 apples.", "42"),
    ("#### 3.0", "3"),
    ("#### $18", "18"),
    ("It costs 5.50 dollars", "5.5"),
    ("x = 10 + 2\nSo 12 cookies", "12"),
    ("#### -7", "-7"),
    ("0.00", "0"),
    ("#### 1,000,000\nQuestion: next one 5", "1000000"),
    ("#### \nthe total is 9 km", "9"),  # nothing after ####: the last number
    ("no number here", None),
    ("", None),
])
def test_tricky_answers(text, expected):
    assert extract_answer(text) == expected
