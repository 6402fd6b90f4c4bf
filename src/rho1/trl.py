"""SLM inside a TRL ``SFTTrainer`` script: change the trainer class (``pip install rho1[trl]``).

    from rho1.trl import SelectiveSFTTrainer

    trainer = SelectiveSFTTrainer(model="path/or/name", args=SFTConfig(...), train_dataset=ds,
                                  reference_model="self", ratio=0.6)   # or a reference model
    trainer.train()

Everything TRL does to the data stays as it is: chat templates, prompt-completion datasets with
``completion_only_loss``, ``assistant_only_loss``, packing (padding-free or not). Those masks become labels of
-100, and rho1's selection (``ratio``, ``score``, ``rule``, the chunked loss where the head is plain linear)
ranks only the tokens left: a prompt token is never selected. Reference losses come from
``reference_model`` (a model run under ``no_grad``, or ``"self"``: the learner's own starting weights,
moved by ``reference_ema`` or ``reference_update``), or from a ScoreStore with
``data_collator=SelectiveCollator(tokenizer, scores=...)`` over the scored store's windows,
``datasets.Dataset.from_list(list(rho1.hf.windows_dataset(store, seq_len, "target")))``, with
``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})`` (the windows are already tokenized, masked and
fixed: packing does not apply; tested). ``model`` may be a .gguf file's path (rho1 loads it, and its tokenizer);
with ``peft_config=`` (LoRA) a self reference is the learner's own base, not a copy. A dataset without the
columns SFT reads is one sentence naming them. See ``rho1.hf.SelectiveTrainer`` for the options and how the loss
is normalised.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as err:  # the optional extra
    raise ImportError("rho1.trl needs TRL: pip install 'rho1[trl]' (or pip install trl)") from err

from rho1.data.tokenizer import load_tokenizer
from rho1.hf import SelectiveTrainer
from rho1.model import load_model
from rho1.pretrained import is_gguf


def check_sft_columns(dataset, args, formatting_func=None, which: str = "train_dataset") -> None:
    """One sentence, before TRL reads a record, when ``dataset`` has none of the columns SFT takes: the text field
    (``args.dataset_text_field``, "text" by default), "messages", "prompt" and "completion", or tokenized
    "input_ids"."""
    columns = getattr(dataset, "column_names", None)
    kwargs = getattr(args, "dataset_kwargs", None) or {}
    if columns is None or formatting_func is not None or kwargs.get("skip_prepare_dataset"):
        return  # an IterableDataset without features, or data the user prepares: nothing to check here
    columns = list(columns.values())[0] if isinstance(columns, dict) else list(columns)
    text = getattr(args, "dataset_text_field", None) or "text"
    if text in columns or "messages" in columns or "input_ids" in columns or {"prompt", "completion"} <= set(columns):
        return
    half = " (it has 'prompt' without 'completion')" if "prompt" in columns else (
        " (it has 'completion' without 'prompt')" if "completion" in columns else "")
    raise ValueError(f"{which} has the columns {', '.join(map(repr, columns)) or 'none'}{half}, and SFT reads a "
                     f"text column {text!r} (SFTConfig(dataset_text_field=...)), 'messages' (chats), 'prompt' and "
                     "'completion', or tokenized 'input_ids'; rename a column (dataset.rename_column) or pass "
                     "formatting_func=")


class SelectiveSFTTrainer(SelectiveTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss is rho1's selective loss (``SelectiveTrainer.compute_loss``): TRL
    prepares, masks and packs the data; rho1 ranks and keeps the top ``ratio`` of the trainable tokens."""

    def __init__(self, *args, **kwargs):
        names = ("model", "args", "data_collator", "train_dataset", "eval_dataset")
        given = {**dict(zip(names, args)), **kwargs}
        model = given.get("model")
        if isinstance(model, str) and is_gguf(model):  # TRL's from_pretrained takes no GGUF file: rho1 loads it
            args, kwargs = (), {**given, "model": load_model(model)}
            if kwargs.get("processing_class") is None:
                kwargs["processing_class"] = load_tokenizer(model)
        for which in ("train_dataset", "eval_dataset"):
            datasets = given.get(which)
            for name, dataset in (datasets.items() if isinstance(datasets, dict) else [(which, datasets)]):
                if dataset is not None:
                    check_sft_columns(dataset, given.get("args"), given.get("formatting_func"), name)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
        return SelectiveTrainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs,
                                             num_items_in_batch)


__all__ = ["SelectiveSFTTrainer", "check_sft_columns"]
