"""Scoring speed of a reference with another tokenizer (the projection of its losses onto the store's tokens)
against a reference with the store's own tokenizer, side by side, interleaved, on generated demo web pages.

    .venv/bin/python benchmarks/projection_speed.py [--web 1500] [--repeats 3] [--threads 1]

Both references are the same Llama shape (--preset) (BPE 2048 for the store and the direct reference, BPE 4096
trained on the same text for the other one); the ratio is projected tokens/s over direct tokens/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import web_store  # noqa: E402

from rho1.data.tokenizer import train_bpe  # noqa: E402
from rho1.model import build_model  # noqa: E402
from rho1.score import ScoreConfig, score  # noqa: E402


def save_reference(path: Path, tokenizer, seed: int, preset: str) -> Path:
    model = build_model(preset, len(tokenizer), 2048, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", type=int, default=1500, help="demo web pages in the store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="tiny", help="size of both references (nano: the projection's own cost "
                        "shows most)")
    parser.add_argument("--out", default="runs/bench-projection")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    store = web_store(out, args.web)
    texts = [store.tokenizer().decode(store.tokens[i : i + 4096].tolist()) for i in range(0, store.n_tokens, 4096)]
    direct = save_reference(out / "direct", store.tokenizer(), 1, args.preset)
    other = save_reference(out / "other", train_bpe(texts, 4096), 1, args.preset)
    seconds = {"direct": [], "projected": []}
    for repeat in range(args.repeats):
        for name, model, cross in (("direct", direct, False), ("projected", other, True)):
            target = out / f"scores-{name}-{repeat}"
            shutil.rmtree(target, ignore_errors=True)
            start = time.perf_counter()
            score(ScoreConfig(str(store.path), str(model), str(target), 256, batch_size=16, cross_tokenizer=cross),
                  progress=False)
            seconds[name].append(time.perf_counter() - start)
    speed = {k: store.n_tokens / float(np.median(v)) for k, v in seconds.items()}
    print(f"{args.preset}: {store.n_tokens:,} tokens, {args.repeats} repeats interleaved, {args.threads} thread(s): direct "
          f"{speed['direct']:,.0f} tokens/s, projected {speed['projected']:,.0f} tokens/s, ratio "
          f"{speed['projected'] / speed['direct']:.2f}")


if __name__ == "__main__":
    main()
