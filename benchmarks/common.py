"""Set-up shared by the benchmark scripts: the real-data folder, a TokenStore of generated demo web pages, and
model shapes."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import transformers

from rho1.data.prepare import PrepareConfig, prepare
from rho1.data.store import TokenStore
from rho1.experiments import demo_data as demo

# the demo's tiny Llama (the head is small), and one with a 32k vocabulary (the head holds most parameters)
SHAPES = {
    "tiny (vocab 2048)": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=384,
                              vocab_size=2048),
    "vocab 32k": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704,
                      vocab_size=32768),
}


def web_store(out: Path, n_web: int) -> TokenStore:
    """A fresh ``out`` holding a TokenStore of ``n_web`` demo web pages (BPE 2048) in ``out/web``."""
    transformers.utils.logging.disable_progress_bar()
    shutil.rmtree(out, ignore_errors=True)
    files = demo.generate(out / "data", n_reference=10, n_web=n_web, n_heldout=1, n_offtarget=1)
    return prepare(PrepareConfig([str(files["web"])], str(out / "web"), train_tokenizer=2048, text_field="text"),
                   progress=False)


class StageTimes(dict):
    """Seconds of each stage of a benchmark: ``stage("base")`` records the time since the previous stage."""

    def __init__(self):
        super().__init__()
        self.start = time.time()

    def __call__(self, name: str) -> None:
        self[name] = round(time.time() - self.start, 1)
        self.start = time.time()


# the model-written solutions of gsm8k/example_model_solutions.jsonl, right and wrong
SOLVERS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")

# what a --data-dir must hold, relative to it
DATA_FILES = ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "gsm8k/example_model_solutions.jsonl",
              "tinyshakespeare/input.txt")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the project


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None,
                        help=f"folder holding {', '.join(DATA_FILES)} (default ../shared/data beside the project)")


def check_data_dir(data_dir: Path | None) -> Path:
    """The real-data folder, or one sentence saying what it must hold and how to get it."""
    missing = list(DATA_FILES) if data_dir is None else [f for f in DATA_FILES if not (data_dir / f).is_file()]
    if missing:
        where = "no --data-dir was given and ../shared/data does not exist" if data_dir is None else \
            f"--data-dir {data_dir} lacks {', '.join(missing)}"
        raise SystemExit(
            f"{where}: pass --data-dir DIR holding {', '.join(DATA_FILES)} (GSM8K from github.com/openai/"
            "grade-school-math, or `datasets.load_dataset('openai/gsm8k', 'main')` saved as train/test jsonl; "
            "Tiny Shakespeare from karpathy/char-rnn)")
    return data_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write ``records`` as jsonl, unless the file already holds exactly them (another run may be reading it)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path
