"""Run by test_hf under torchrun: SelectiveTrainer with stored scores, accumulation 2, 3 steps."""

import json
import sys
from pathlib import Path

from transformers import TrainingArguments

from rho1.data.store import ScoreStore, TokenStore
from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
from rho1.model import load_model

store_path, scores_path, model_path, out, batch, ratio = sys.argv[1:7]
store = TokenStore.open(store_path)
scores = ScoreStore.open(scores_path, store)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), gradient_accumulation_steps=2,
                         max_steps=3, learning_rate=3e-3, seed=0, report_to=[], logging_steps=1, save_strategy="no",
                         use_cpu=True, lr_scheduler_type="constant", dataloader_drop_last=True)
# no shuffling, so 1 process x 4 and 2 processes x 2 see the same 4 windows per micro-batch step
trainer = SelectiveTrainer(model=load_model(model_path), args=args, train_dataset=windows_dataset(store, 64)[:48],
                           data_collator=SelectiveCollator(store.tokenizer(), scores=scores), ratio=float(ratio))
trainer._get_train_sampler = lambda *a, **k: __import__("torch").utils.data.SequentialSampler(trainer.train_dataset)
trainer.train()
if trainer.is_world_process_zero():
    Path(out, "losses.json").write_text(json.dumps([r["loss"] for r in trainer.state.log_history if "loss" in r]))
