"""SLM with the excess loss measured once, for the benchmarks: `rho1 export` against the starting model, then a
plain transformers.Trainer (no rho1 loss) on its labels."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rho1.config import TrainConfig
from rho1.data.store import TokenStore
from rho1.head import token_losses
from rho1.model import load_model


def static_run(run: TrainConfig, start_model: str, scores: str, out: Path, precision: str = "no") -> dict:
    """SLM with the excess loss measured once: `rho1 export` against the starting model, then a plain
    transformers.Trainer (no rho1 loss) on its labels, with rho1 train's optimizer, schedule and data order;
    the held-out target loss is measured as rho1 train measures it and written to OUT/metrics.jsonl."""
    import datasets
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from rho1.config import ExportConfig
    from rho1.eval.heldout import summarize
    from rho1.export import export

    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    store = TokenStore.open(run.data)
    export(ExportConfig(data=run.data, scores=scores, model=start_model, out=str(out / "export"), ratio=run.ratio,
                        score=run.score, rule=run.rule, temperature=run.temperature, threshold=run.threshold,
                        seq_len=run.seq_len, batch_size=run.batch_size, seed=run.seed, precision=precision,
                        threads=run.threads), progress=False)
    evals = {Path(p).name: TokenStore.open(p) for p in run.eval_data}
    step_tokens = run.batch_size * run.seq_len
    records = []

    def evaluate(model, tokens):
        record = {"kind": "eval", "tokens": tokens}
        for name, s in evals.items():
            losses = token_losses(model, s, run.seq_len, 32)
            for key, value in summarize(losses, s, None, None).items():
                record[f"eval/{name}/{key}"] = value
        records.append(record)

    class Eval(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            tokens = state.global_step * step_tokens
            if tokens % run.eval_every < step_tokens or state.global_step == state.max_steps:
                evaluate(model, min(tokens, run.max_tokens))

    class InOrder(Trainer):  # the export is already in rho1 train's order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    tokenizer = store.tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = load_model(start_model)
    steps = -(-run.max_tokens // step_tokens)
    targs = TrainingArguments(str(out / "hf"), per_device_train_batch_size=run.batch_size, max_steps=steps,
                              learning_rate=run.lr, weight_decay=run.weight_decay, adam_beta2=0.95,
                              max_grad_norm=run.grad_clip, warmup_steps=run.warmup_steps,
                              lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": run.min_lr_ratio},
                              report_to=[], save_strategy="no", logging_steps=10, seed=run.seed,
                              use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16",
                              dataloader_drop_last=False, disable_tqdm=True)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    evaluate(model, 0)
    trainer = InOrder(model=model, args=targs, train_dataset=datasets.load_from_disk(str(out / "export" / "dataset")),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100), callbacks=[Eval()])
    trainer.remove_callback(PrinterCallback)
    start = time.time()
    trainer.train()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"tokens": steps * step_tokens, "seconds": time.time() - start, **{k: v for k, v in records[-1].items()
                                                                                  if k.startswith("eval/")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
