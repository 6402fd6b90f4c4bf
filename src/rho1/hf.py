"""SLM inside a Hugging Face ``Trainer`` script: change the Trainer class and the collator.

    trainer = SelectiveTrainer(model=model, args=args, train_dataset=ds,
                               data_collator=SelectiveCollator(tokenizer),   # was DataCollatorForLanguageModeling
                               reference_model=ref_model, ratio=0.6)         # or: scores=ScoreStore + "offset"
    trainer.train()

Reference losses come from a reference model run inside ``compute_loss`` (online, under ``no_grad``) or
from a ScoreStore: then each example carries ``offset``, the stream position of its first token in the
store the scores belong to (``windows_dataset`` makes such examples), and the collator looks them up.
With the default ``topk`` rule the loss is the selected tokens' cross-entropy summed over the whole
optimizer step (all accumulated micro-batches, all processes) divided by the number of tokens selected in
it, as in `rho1 train`; other rules take the weighted mean of each micro-batch (see SelectiveTrainer).
Labels of ``-100`` (padding, SFT prompt tokens) are never selected. ``reference_model="self"``: the learner's
own starting weights are the reference (``reference_ema`` / ``reference_update`` move it, as `rho1 train
--reference self`); ``rho1.trl.SelectiveSFTTrainer`` is the same on TRL's ``SFTTrainer``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from rho1.align import CrossTokenizerReference
from rho1.checks import check_self_reference
from rho1.data.store import IGNORE_INDEX
from rho1.data.windows import SelectiveCollator, WindowsDataset, windows_dataset  # noqa: F401 (rho1.hf's API)
from rho1.head import chunked_head_supported, forward_selection, head_is_linear, reference_token_losses
from rho1.lora import REFERENCE, AdapterView, advance_adapter_reference, reference_adapter
from rho1.model import position_limit
from rho1.selection import (
    check_ratio,
    check_rule_options,
    check_score,
    get_score,
    num_selected,
    select_from_token_loss,
    token_cross_entropy,
)
from rho1.self_reference import REFERENCE_FILE, advance_reference, check_self_reference_supported, frozen_copy


def check_batch_fits(model, input_ids: torch.Tensor, which: str = "the model", position_ids=None) -> None:
    """One sentence instead of an IndexError deep in the forward: ids beyond the model's vocabulary, or
    rows longer than its positions (``position_ids``: a packed row holds several sequences, each from 0)."""
    limit = position_limit(model)
    length = input_ids.shape[-1] if position_ids is None or not position_ids.numel() else int(position_ids.max()) + 1
    if limit is not None and length > limit:
        raise ValueError(f"a batch has rows of {length} tokens but {which} takes at most {limit} "
                         f"positions; make the examples at most {limit} tokens long (windows_dataset(store, {limit}))")
    n_embed = model.get_input_embeddings().num_embeddings
    largest = int(input_ids.max()) if input_ids.numel() else -1
    if largest >= n_embed:
        fix = ("pass reference_tokenizer=ITS_TOKENIZER to project its losses onto the model's tokens"
               if which == "the reference model" else "tokenize the data with the model's own tokenizer")
        raise ValueError(f"a batch holds token id {largest} but {which} has {n_embed} token embeddings (another "
                         f"tokenizer); {fix}")


class SelectiveTrainer(Trainer):
    """``transformers.Trainer`` with the SLM loss: only the top ``ratio`` of tokens by ``score`` (default
    excess loss = learner loss - reference loss) contribute. ``ratio=1`` is the ordinary causal LM loss.

    ``rule`` (``topk`` by default; ``soft``, ``threshold`` or one's own, see ``rho1.register_rule``) turns the
    scores into token weights. ``topk`` knows how many tokens it keeps before the forward, so its loss is
    normalised over the whole optimizer step as in `rho1 train`; the other rules' loss is the weighted mean
    of each micro-batch, averaged over accumulation steps and processes (the same as `rho1 train` with one
    micro-batch per step and one process).

    ``reference_tokenizer``: the reference model's own tokenizer when it is not the learner's; its losses
    are then projected onto the learner's tokens (``rho1.align``; the learner's tokenizer comes from
    ``processing_class`` or the collator).

    ``reference_model="self"``: a copy of the learner's starting weights is the reference, scored by default
    with ``retrospective`` (reference loss - learner loss, ssToken's); ``reference_ema=DECAY`` makes it a moving
    average of the learner's weights, ``reference_update=N`` a copy of the learner every N optimizer steps. Its
    weights are saved in each checkpoint (``reference.safetensors``) and restored by
    ``train(resume_from_checkpoint=...)``. When the model is a ``PeftModel`` (LoRA; TRL's ``peft_config=``), no copy
    is made: the reference is its base with the adapters off, or a second adapter on it that moves (saved and
    restored with Trainer's own adapter checkpoints)."""

    def __init__(self, *args, ratio: float = 0.6, score: str | None = None, reference_model=None,
                 loss_impl: str = "auto", rule: str = "topk", temperature: float = 0.25, threshold: float = 0.0,
                 reference_tokenizer=None, reference_ema: float | None = None, reference_update: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.self_reference = isinstance(reference_model, str) and reference_model == "self"
        self.ratio = check_ratio(ratio)
        self.score = check_score(score or ("retrospective" if self.self_reference else "excess"))
        check_self_reference(self.self_reference, reference_ema, reference_update, cli=False)
        self.reference_ema, self.reference_update = reference_ema, int(reference_update)
        check_rule_options(rule, temperature, threshold)
        self.rule, self.rule_options = rule, {"temperature": temperature, "threshold": threshold}
        if loss_impl not in ("auto", "logits"):
            raise ValueError(f"loss_impl must be auto or logits, got {loss_impl!r}")
        self.loss_impl = loss_impl
        self.reference_model = self._reference(reference_model, reference_tokenizer)
        self._check_reference_losses()
        if self.reference_model is not None:
            self.reference_model.to(self.args.device).eval().requires_grad_(False)
        self._chunked_head: bool | None = None  # decided at the first batch (see _use_chunked_head)
        self._ref_head = None
        self._batch_checked = False
        self.selection_stats: dict = {}
        self.last_selection: torch.Tensor | None = None  # the weights of the last batch's tokens (shifted labels)

    def _reference(self, reference_model, reference_tokenizer):
        """The reference model as given: ``"self"`` (a copy of the learner), a path or hub name, a model, and with
        ``reference_tokenizer`` (another tokenizer than the learner's) wrapped to project its losses."""
        if self.self_reference:
            return self._self_reference()
        if isinstance(reference_model, (str, Path)):
            from rho1.model import load_model

            reference_model = load_model(str(reference_model))
        if reference_tokenizer is None:
            return reference_model
        if reference_model is None:
            raise ValueError("SelectiveTrainer(reference_tokenizer=...) is the tokenizer of reference_model=...; "
                             "pass the reference model too")
        learner_tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if learner_tokenizer is None:
            raise ValueError("SelectiveTrainer(reference_tokenizer=...) needs the learner's tokenizer: pass "
                             "processing_class=TOKENIZER (or a collator with a .tokenizer)")
        return CrossTokenizerReference(reference_model, reference_tokenizer, learner_tokenizer)

    def _self_reference(self):
        """A frozen copy of the learner's starting weights (float32 when it is a moving average), moved after each
        optimizer step by ``reference_ema`` / ``reference_update``; a PeftModel's own base instead (its adapters
        off), or a second adapter on it when the reference moves: no frozen weight held twice."""
        sharded = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP" if self.is_fsdp_enabled else None
        check_self_reference_supported(sharded, "pass a reference model or scores")
        moves = self.reference_ema is not None or bool(self.reference_update)
        if moves:
            self.add_callback(_MoveSelfReference(self))
        learner = self.accelerator.unwrap_model(self.model)
        if not self.peft_learner:
            return frozen_copy(learner, float32=self.reference_ema is not None)
        if moves:
            reference_adapter(learner, "copy")
        return AdapterView(learner, REFERENCE if moves else None)

    @property
    def peft_learner(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "peft_config")

    def _check_reference_losses(self) -> None:
        if self._selecting and get_score(self.score).needs_reference and not self._has_reference_losses():
            raise ValueError(f"SelectiveTrainer with score={self.score!r} needs reference losses: pass "
                             "reference_model=MODEL, or data_collator=SelectiveCollator(tokenizer, scores=ScoreStore) "
                             "over a windows_dataset, or a dataset with a 'ref_loss' column")

    def train(self, *args, **kwargs):
        """Trainer.train, holding the write lock of ``output_dir`` (one writer per folder, as `rho1 train`)."""
        import contextlib

        from rho1.accel import hold_job_lock

        with contextlib.ExitStack() as held:
            if self.args.output_dir:
                hold_job_lock(held, self.accelerator, self.args.output_dir, type(self).__name__)
            return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """A checkpoint's model, and with a self reference its weights beside them: written before Trainer marks
        the checkpoint complete (trainer_state.json) and rotates older ones away."""
        super().save_model(output_dir, _internal_call)
        if self.self_reference and not self.peft_learner and _internal_call and self.args.should_save:
            from safetensors.torch import save_model

            save_model(self.reference_model, str(Path(output_dir or self.args.output_dir) / REFERENCE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.self_reference and not self.peft_learner:  # (a PeftModel's reference adapter is Trainer's to load)
            from safetensors.torch import load_model

            path = Path(resume_from_checkpoint) / REFERENCE_FILE
            if not path.is_file():
                raise ValueError(f"{resume_from_checkpoint} has no {REFERENCE_FILE}: it was not saved by a "
                                 "trainer with reference_model='self'")
            load_model(self.reference_model, path, device=str(self.args.device))

    @property
    def _selecting(self) -> bool:
        return self.ratio < 1.0 or self.rule != "topk"

    def _has_reference_losses(self) -> bool:
        if self.reference_model is not None or getattr(self.data_collator, "scores", None) is not None:
            return True
        columns = getattr(self.train_dataset, "column_names", None)
        if columns is None and self.train_dataset is not None and hasattr(self.train_dataset, "__getitem__"):
            try:
                columns = list(self.train_dataset[0])
            except (IndexError, KeyError, TypeError):
                columns = []
        return "ref_loss" in (columns or [])

    def _set_signature_columns_if_needed(self):
        # keep the columns the collator needs when Trainer drops those the model's forward does not take
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(c for c in ("offset", "ref_loss")
                                                               if c not in self._signature_columns)]

    def _reference_loss(self, inputs: dict, shifted_labels: torch.Tensor) -> torch.Tensor:
        ref = self.reference_model
        if getattr(ref, "cross_tokenizer", False):  # it reads the text of the predicted tokens too
            losses = ref.losses(inputs["input_ids"])[:, :-1].to(shifted_labels.device)
            return torch.where(shifted_labels != IGNORE_INDEX, losses.half().float(), torch.nan)
        if self._ref_head is None:  # the same check as the learner's head, once
            self._ref_head = ref if head_is_linear(ref, inputs["input_ids"][:1, :32]) else False
        packed = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "use_cache", "labels",
                                                                "ref_loss")}
        if packed:  # rows holding several sequences (position_ids, TRL's padding-free packing): read them whole
            labels = torch.nn.functional.pad(shifted_labels, (0, 1), value=IGNORE_INDEX)
            return reference_token_losses(ref, inputs["input_ids"], labels, self._ref_head or None,
                                          extra=packed, rounded=not self.self_reference)[:, :-1]
        return reference_token_losses(ref, inputs["input_ids"][:, :-1], shifted_labels, self._ref_head or None,
                                      rounded=not self.self_reference)

    def _shifted(self, batch: dict):
        labels = batch["labels"][:, 1:]
        ref = batch["ref_loss"][:, 1:] if batch.get("ref_loss") is not None else None
        return labels, ref

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Counts the tokens selected over the whole optimizer step (every accumulated micro-batch, every
        process): the loss of each micro-batch is divided by it."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is None or self.rule != "topk":  # other rules' weights are known only after the forward
            return batches, None
        selected = 0
        for batch in batches:
            labels, ref = self._shifted(batch)
            if getattr(self.reference_model, "cross_tokenizer", False):  # its NaN positions show once it has run
                ref = self._reference_loss(batch, labels)
                batch["ref_loss"] = torch.nn.functional.pad(ref, (1, 0), value=float("nan"))  # compute_loss takes it
            valid = labels != IGNORE_INDEX
            if ref is not None:
                valid &= torch.isfinite(ref)
            selected += num_selected(int(valid.sum()), self.ratio)
        selected = torch.tensor(selected, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            selected = self.accelerator.gather(selected).sum()
        return batches, selected

    def _use_chunked_head(self, input_ids: torch.Tensor) -> bool:
        """The loss from the head's input in chunks (rho1.selection.selective_linear_cross_entropy) when the
        model's logits are a plain linear head (one process, DDP or FSDP2)."""
        if self._chunked_head is None:
            model = self.accelerator.unwrap_model(self.model)
            self._chunked_head = (self.loss_impl == "auto" and chunked_head_supported(self.accelerator)
                                  and head_is_linear(model, input_ids[:1, :32].to(self.args.device)))
        return self._chunked_head

    def _check_batch(self, model, inputs: dict) -> None:
        """The first batch, then every batch still on the CPU: reading a GPU batch's largest id waits for the
        device, and a later batch of another tokenizer is rare enough to leave to the embedding's own check."""
        if self._batch_checked and inputs["input_ids"].device.type != "cpu":
            return
        positions = inputs.get("position_ids")
        check_batch_fits(self.accelerator.unwrap_model(model), inputs["input_ids"], position_ids=positions)
        if self.reference_model is not None and not getattr(self.reference_model, "cross_tokenizer", False):
            check_batch_fits(self.reference_model, inputs["input_ids"], "the reference model", positions)
        self._batch_checked = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._check_batch(model, inputs)
        inputs = dict(inputs)
        labels, ref = self._shifted(inputs)
        inputs.pop("labels")
        inputs.pop("ref_loss", None)
        if self.reference_model is not None and ref is None:
            ref = self._reference_loss(inputs, labels)
        if not return_outputs and self._use_chunked_head(inputs["input_ids"]):
            selection = forward_selection(model, inputs, labels, ref, self.ratio, self.score, drop_last=True,
                                          head_of=self.accelerator.unwrap_model(model), rule=self.rule,
                                          rule_options=self.rule_options)
            outputs = None
        else:
            outputs = model(**inputs)
            token_loss = token_cross_entropy(outputs.logits[:, :-1], labels)
            selection = select_from_token_loss(token_loss, labels, ref, self.ratio, self.score, rule=self.rule,
                                               rule_options=self.rule_options)
        self.selection_stats = selection.stats
        self.last_selection = selection.weights.detach() if selection.weights is not None else \
            selection.mask.detach().float()
        loss = self._normalised(selection, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _normalised(self, selection, num_items_in_batch) -> torch.Tensor:
        """The selected tokens' loss over the tokens selected in the whole optimizer step (topk), else the mean over
        this micro-batch (Trainer divides it by the accumulation steps)."""
        if num_items_in_batch is None:
            return selection.loss
        loss = selection.loss_sum / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss


class _MoveSelfReference(TrainerCallback):
    """After each optimizer step: the moving average takes a step towards the learner (reference_ema), or
    every reference_update steps the reference becomes a copy of it."""

    def __init__(self, trainer: SelectiveTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        learner = t.accelerator.unwrap_model(t.model)
        if t.peft_learner:
            advance_adapter_reference(learner, state.global_step, t.reference_ema, t.reference_update)
        else:
            advance_reference(t.reference_model, learner, state.global_step, t.reference_ema, t.reference_update)
