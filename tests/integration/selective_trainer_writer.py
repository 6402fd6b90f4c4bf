"""A SelectiveTrainer run writing OUTPUT_DIR (test_one_writer.py starts two): python THIS STORE MODEL OUTPUT_DIR.
A refused second run prints its one sentence and exits 2, as the CLI does."""

import sys

import transformers
from transformers import TrainingArguments

from rho1.data.store import TokenStore
from rho1.hf import SelectiveCollator, SelectiveTrainer, windows_dataset
from rho1.model import load_model

transformers.utils.logging.disable_progress_bar()
store_path, model_path, out = sys.argv[1:4]
store = TokenStore.open(store_path)
model = load_model(model_path)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, learning_rate=1e-3, max_steps=400, seed=0,
                         report_to=[], logging_steps=1, save_strategy="steps", save_steps=100, save_total_limit=2,
                         use_cpu=True)
trainer = SelectiveTrainer(model=model, args=args, train_dataset=windows_dataset(store, 64),
                           data_collator=SelectiveCollator(store.tokenizer()), reference_model="self", ratio=0.6)
try:
    trainer.train()
except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
