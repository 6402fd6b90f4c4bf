"""The script a user would write instead of `rho1 score`: load the model, full logits, cross_entropy, write float16.

    python benchmarks/plain_score.py MODEL_FOLDER TEXT_FILE OUT.bin [--seq-len 256] [--batch-size 8]

It tokenizes the text with the model's tokenizer, cuts the ids into windows of ``seq-len``, and writes one float16
loss per token (NaN for each window's first token), as a ScoreStore's scores.bin holds them. The speed benchmark
(`smollm2_throughput.py`) runs it as a whole process beside `rho1 score` on the same tokens, and prints its MFU.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("text")
parser.add_argument("out")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()
started = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
ids = tokenizer(open(args.text).read())["input_ids"] + [tokenizer.eos_token_id]
losses = np.full(len(ids), np.nan, dtype=np.float16)
windows = [ids[i : i + args.seq_len] for i in range(0, len(ids), args.seq_len)]
loop = time.perf_counter()
with torch.inference_mode():
    for b in range(0, len(windows), args.batch_size):
        batch = windows[b : b + args.batch_size]
        width = max(len(w) for w in batch)
        input_ids = torch.tensor([w + [tokenizer.eos_token_id] * (width - len(w)) for w in batch])
        logits = model(input_ids=input_ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                               reduction="none").view(len(batch), -1)
        for row, w in enumerate(batch):
            start = (b + row) * args.seq_len
            losses[start + 1 : start + len(w)] = loss[row, : len(w) - 1].numpy()
losses.tofile(args.out)
print(json.dumps({"tokens": len(ids), "loop_seconds": time.perf_counter() - loop,
                  "seconds": time.perf_counter() - started}))
