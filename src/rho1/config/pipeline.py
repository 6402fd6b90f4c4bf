"""`rho1 pipeline RECIPE.yaml`: the whole study on your own data in one file (rho1.experiments.pipeline runs it).

A recipe names the model, the data and the budget; anything else a stage takes goes under the stage's name
(``prepare:``, ``score:``, ``train:``, ``reference_train:``) with the CLI's option names. Unknown keys, wrong
types and options the pipeline sets itself are one sentence naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from rho1.checks import check_choice, check_positive, check_ratio
from rho1.config.files import config_from_dict, load_yaml
from rho1.config.options import MODEL_PRESETS, opt
from rho1.config.prepare import PrepareConfig
from rho1.config.score import ScoreConfig
from rho1.config.train import TrainConfig

BASELINES = ("clm", "random")
# what each stage section may not set: the pipeline decides it (data, outputs, the models, the objective)
SET_BY_PIPELINE = {
    "prepare": ("sources", "out", "tokenizer", "train_tokenizer", "overwrite"),
    "score": ("data", "model", "out", "seq_len", "threads"),
    "train": ("data", "out", "model", "model_preset", "objective", "scores", "reference", "ratio", "score",
              "max_tokens", "eval_data", "eval_scores", "eval_every", "resume", "seed", "threads", "selection"),
}
# the reference's evaluations are its own; the runs' come from eval_points so that every run evaluates alike
SET_BY_PIPELINE["reference_train"] = tuple(k for k in SET_BY_PIPELINE["train"] if k != "eval_every")
# where the recipe decides what a stage section may not set
FROM_RECIPE = {"sources": "files: corpus, reference_data, target", "data": "files: corpus, reference_data",
               "model": "key model", "model_preset": "key model", "tokenizer": "key model",
               "train_tokenizer": "keys model and vocab_size", "reference": "key reference", "ratio": "key ratio",
               "max_tokens": "key tokens", "eval_data": "key target", "eval_every": "key eval_points",
               "seed": "key seed", "threads": "key threads", "out": "key out", "seq_len": "section train: seq-len"}
SECTIONS = {"prepare": PrepareConfig, "score": ScoreConfig, "train": TrainConfig, "reference_train": TrainConfig}


@dataclass
class Recipe:
    model: str = opt("tiny", "the learner's start and, unless `reference` names a trained one, the reference's: a "
                     f"preset ({', '.join(MODEL_PRESETS)}: a fresh model), a folder, a hub name or a .gguf file")
    corpus: list[str] = opt(factory=list, help="what every run trains on: files or folders (.txt, .md, .jsonl, "
                            ".parquet)")
    reference_data: list[str] = opt(factory=list, help="high-quality text the reference is trained on")
    reference: str | None = opt(None, "instead of reference_data: a trained reference (folder, hub name, .gguf)")
    target: list[str] = opt(factory=list, help="held-out rows measured on: question/answer, prompt/completion or "
                            "chats (messages); the answers are the target")
    offtarget: list[str] = opt(factory=list, help="held-out text outside the target domain (its loss is reported)")
    tokens: int = opt(1_000_000, "tokens of every training run (SLM and each baseline)")
    ratio: float = opt(0.6, "fraction of tokens SLM keeps, in (0, 1]")
    baselines: list[str] = opt(factory=lambda: list(BASELINES), help="runs SLM is compared with: clm, random")
    reference_tokens: int | None = opt(None, "tokens of the reference's training (default: two passes over "
                                       "reference_data)")
    base_tokens: int = opt(0, "a preset model is first pretrained on the corpus for this many tokens; the reference "
                           "and every run start from that base (0: they start from the fresh model)")
    vocab_size: int = opt(2048, "a preset model: the BPE vocabulary trained on the corpus")
    seed: int = opt(0, "the data order and the fresh model's weights")
    eval_points: int = opt(8, "held-out evaluations per run")
    out: str = opt("runs/pipeline", "folder of the whole study: stores, reference, scores, runs, results, report")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores idle at start)")
    prepare: dict = opt(factory=dict, help="options of `rho1 prepare` for every store (e.g. text-field, workers)")
    score: dict = opt(factory=dict, help="options of `rho1 score` (e.g. batch-size, precision)")
    train: dict = opt(factory=dict, help="options of `rho1 train` for every run (e.g. lr, seq-len, batch-size)")
    reference_train: dict = opt(factory=dict, help="options of `rho1 train` for the reference only (over train:)")

    def check(self, where: str = "the recipe") -> None:
        if not self.corpus:
            raise ValueError(f"{where} has no corpus: name the files every run trains on (corpus: [data.jsonl])")
        if bool(self.reference_data) == bool(self.reference):
            raise ValueError(f"{where} needs exactly one of reference_data (text to train the reference on) and "
                             "reference (a trained reference model)")
        check_ratio(self.ratio)
        for b in self.baselines:
            check_choice("baselines", b, BASELINES)
        check_positive(self, "tokens", "vocab_size", "eval_points", "reference_tokens", "threads")
        check_positive(self, "base_tokens", allow_zero=("base_tokens",))
        if self.base_tokens and self.model not in MODEL_PRESETS:
            raise ValueError(f"{where}: base_tokens pretrains a fresh preset model, and model {self.model!r} is "
                             "pretrained already; drop base_tokens")
        for name, cls in SECTIONS.items():
            self.section(name, cls, where)

    def section(self, name: str, cls, where: str = "the recipe"):
        """The options of one stage section as a config of that stage (its defaults elsewhere)."""
        values = getattr(self, name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{where}: {name} must be a mapping of option: value, got {values!r}")
        set_here = SET_BY_PIPELINE[name]
        for key in values:
            field = str(key).lstrip("-").replace("-", "_")
            if field in set_here:
                source = FROM_RECIPE.get(field)
                raise ValueError(f"{where}: {name}: {key} is set by the pipeline itself"
                                 f"{f' (from the recipe {source})' if source else ''}; drop it")
        return config_from_dict(cls, values, f"{where}: {name}")

    def options(self, name: str) -> dict:
        """A stage section's options as config field names (seq-len -> seq_len), each of its field's type: YAML
        reads ``5e-5`` as a string, the stage needs the float."""
        config = self.section(name, SECTIONS[name])
        return {key: getattr(config, key) for key in (str(k).lstrip("-").replace("-", "_") for k in
                                                      (getattr(self, name) or {}))}


def load_recipe(path: str) -> Recipe:
    """A recipe file read and checked, or one sentence naming what is wrong."""
    where = f"recipe {path}"
    recipe = config_from_dict(Recipe, load_yaml(path), where)
    recipe.check(where)
    return recipe


@dataclass
class PipelineConfig:
    recipe: str | None = opt(None, "the recipe file (YAML); `rho1 pipeline --example` prints a commented one",
                             positional=True)
    example: bool = opt(False, "print a commented example recipe and exit")

    def check(self) -> None:
        if not self.example and not self.recipe:
            raise ValueError("rho1 pipeline needs a recipe file: rho1 pipeline RECIPE.yaml (rho1 pipeline --example "
                             "prints one to start from)")
        if self.recipe and not self.example:
            load_recipe(self.recipe)  # every mistake of the file, before anything heavy is imported


EXAMPLE = """\
# rho1 pipeline recipe: SLM on your own data in one command (`rho1 pipeline THIS_FILE`).
# Paths are relative to where you run the command. Run it again: finished stages are kept; change a
# number and only the stages it feeds run again.

model: HuggingFaceTB/SmolLM2-135M      # the start of the reference and of every run: a preset (nano, tiny,
                                      # small, medium, large, xl: a fresh model), a folder, a hub name or a .gguf
reference_data: [clean.jsonl]          # high-quality text the reference is trained on (the paper: 3 passes) ...
# reference: runs/my-reference/final  # ... or a reference you trained already
corpus: [corpus.jsonl]                 # what SLM and the baselines train on
target: [heldout.jsonl]                # held-out rows (question/answer, prompt/completion or chats) to measure on
tokens: 200_000                        # tokens of every training run
ratio: 0.6                             # SLM keeps the top 60% of tokens by excess loss
baselines: [clm, random]               # CLM on every token, and 60% of the tokens at random
out: runs/my-study                     # stores, reference, scores, runs, results.json, report.html

# any option of a stage, under its name, as on the command line:
train:                                 # every run (the reference too)
  lr: 5e-5                             # a pretrained model wants a small learning rate
  seq-len: 512
  batch-size: 8
# reference_train: {lr: 1e-4}          # the reference only
# prepare: {text-field: body}          # every store (the fields are found by themselves otherwise)
# score: {precision: bf16}
"""
