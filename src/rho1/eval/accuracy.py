"""Math answer accuracy (`rho1 eval --answers`): few-shot prompts, batched greedy generation, answer
extraction and exact match, plus the loss on the gold solution tokens (the paper's downstream loss).

Records are GSM8K-style: ``question`` and ``answer``, the answer ending in ``#### N``. The prompt is the
template rho1 trains math on, ``Question: ...\\nAnswer: ...``, with ``shots`` solved exemplars first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from rho1.config import AnswerConfig
from rho1.data.sources import read_jsonl_records
from rho1.progress import progress_bar

# the training text of a problem (rho1 prepare --template) and, cut before the answer, its prompt
QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"
PROMPT_TEMPLATE = QA_TEMPLATE.split(" {answer}")[0]
STOP = "\nQuestion:"  # the model starting the next problem ends its answer
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """A number as a canonical string: no commas, currency, units or trailing zeros ('$1,200.50' -> '1200.5')."""
    match = _NUMBER.search(text.replace("$", "").replace("\u2212", "-"))
    if not match:
        return None
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number.startswith("-0") and number.strip("-0.") == "":
        number = "0"
    return number.lstrip("+") or "0"


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: the number after '####' when there is one, else the last
    number in the text, normalised (commas, '$', units and a trailing '.0' removed)."""
    if "####" in text:
        after = text.split("####", 1)[1].strip()
        found = normalize_number(after.splitlines()[0] if after else "")
        if found is not None:
            return found
    numbers = _NUMBER.findall(text.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def few_shot_prompt(question: str, exemplars: list[dict], tokenizer=None) -> str:
    """The prompt of a problem: ``Question: ...\nAnswer:`` after the solved exemplars, or with ``tokenizer`` its chat
    template's rendering of the exemplars as earlier exchanges and the question as the user's turn."""
    if tokenizer is None:
        shots = "".join(QA_TEMPLATE.format(question=e["question"], answer=e["answer"].strip()) + "\n\n"
                        for e in exemplars)
        return shots + PROMPT_TEMPLATE.format(question=question)
    turns = [m for e in exemplars for m in ({"role": "user", "content": e["question"]},
                                            {"role": "assistant", "content": e["answer"].strip()})]
    return tokenizer.apply_chat_template([*turns, {"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
                     progress: bool = False) -> list[str]:
    """Greedy continuations of the prompts, cut at the stop rule (the next 'Question:') and at EOS (a chat
    template's end of turn)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        batch = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                   stop_strings=[STOP], tokenizer=tokenizer)
        for row in generated[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text.split(STOP)[0].strip())
    return outputs


@torch.no_grad()
def gold_loss(model, tokenizer, prompts: list[str], solutions: list[str], chat: bool = False) -> float:
    """Mean loss per token of the gold solutions given their prompts (the paper's downstream loss)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for prompt, solution in zip(prompts, solutions):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        s = tokenizer(("" if chat else " ") + solution.strip(), add_special_tokens=False).input_ids
        ids = torch.tensor([p + s], device=device)
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        total += float(F.cross_entropy(logits, ids[0, len(p) :], reduction="sum"))
        count += len(s)
    return total / max(count, 1)


def answer_accuracy(model, tokenizer, cfg: AnswerConfig, progress: bool = True) -> dict:
    records = read_jsonl_records(Path(cfg.answers), ("question", "answer"))
    if cfg.exemplars:
        exemplars = read_jsonl_records(Path(cfg.exemplars), ("question", "answer"))[: cfg.shots]
    else:
        exemplars, records = records[: cfg.shots], records[cfg.shots :]
    if len(exemplars) < cfg.shots:
        raise ValueError(f"--shots {cfg.shots} needs {cfg.shots} exemplars but only {len(exemplars)} are available")
    if cfg.limit:
        records = records[: cfg.limit]
    if not records:
        raise ValueError(f"{cfg.answers} has no problems left to evaluate; lower --shots or pass --exemplars")
    if cfg.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat prompts with the model's chat template, and its tokenizer has none; drop --chat (the "
                         "prompts are then 'Question: ... Answer:')")
    prompts = [few_shot_prompt(r["question"], exemplars, tokenizer if cfg.chat else None) for r in records]
    was_training = model.training
    model.eval()
    generations = generate_answers(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, progress)
    downstream = gold_loss(model, tokenizer, prompts, [r["answer"] for r in records], cfg.chat)
    model.train(was_training)
    rows = []
    for record, prompt, text in zip(records, prompts, generations):
        gold, predicted = extract_answer(record["answer"]), extract_answer(text)
        rows.append({"question": record["question"], "prompt": prompt, "generation": text, "extracted": predicted,
                     "gold": gold, "correct": predicted is not None and predicted == gold})
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "problems": len(rows), "shots": cfg.shots,
            "chat": cfg.chat, "gold_loss": downstream}
