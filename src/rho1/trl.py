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
fixed: packing does not apply; tested). See
``rho1.hf.SelectiveTrainer`` for the options and how the loss is normalised.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as err:  # the optional extra
    raise ImportError("rho1.trl needs TRL: pip install 'rho1[trl]' (or pip install trl)") from err

from rho1.hf import SelectiveTrainer


class SelectiveSFTTrainer(SelectiveTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` whose loss is rho1's selective loss (``SelectiveTrainer.compute_loss``): TRL
    prepares, masks and packs the data; rho1 ranks and keeps the top ``ratio`` of the trainable tokens."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
        return SelectiveTrainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs,
                                             num_items_in_batch)


__all__ = ["SelectiveSFTTrainer"]
