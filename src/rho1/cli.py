"""The `rho1` command: one subcommand per pipeline stage. Thin: parse, build the stage's config, call it.

Every subcommand takes ``--config FILE.yaml`` whose keys are the stage's config fields; flags given on
the command line override the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from rho1.pipeline import PRESETS as DEMO_PRESETS


def _load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return data


def _build(config_cls, args: argparse.Namespace, base=None):
    """The stage config: defaults (or ``base``) < YAML --config < flags given on the command line."""
    names = {f.name for f in fields(config_cls)}
    values = dict(vars(base)) if base is not None else {}
    if getattr(args, "config", None):
        data = _load_yaml(args.config)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config file {args.config} has unknown keys {unknown}; valid keys: {sorted(names)}")
        values.update(data)
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return config_cls(**values)


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="tokenize text sources into a TokenStore")
    p.add_argument("sources", nargs="*", help=".txt/.md files or folders, .jsonl, .parquet, folders written by "
                   "datasets' save_to_disk, or hf:NAME[:CONFIG] (datasets.load_dataset: a hub name or a local folder)")
    p.add_argument("--split", help="split read from Hugging Face datasets (default train)")
    p.add_argument("--out", "-o", help="TokenStore directory to write")
    p.add_argument("--tokenizer", help="HF tokenizer name or path, or a TokenStore whose tokenizer to reuse")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of this size on the sources (saved inside the store)")
    p.add_argument("--text-field", help="jsonl/parquet field holding the text (default: text)")
    p.add_argument("--template", help='format records, e.g. "Question: {question}\\nAnswer: {answer}"')
    p.add_argument("--target-field", help="template field whose tokens count for target-domain metrics")
    p.add_argument("--trust-remote-code", action="store_true", default=None)


def _add_train(sub):
    p = sub.add_parser("train", help="train a causal LM with the CLM or SLM objective")
    p.add_argument("--out", "-o", help="run directory")
    p.add_argument("--objective", choices=["clm", "slm"])
    _train_options(p)


def _train_options(p):
    """The options `train` and `sweep` share."""
    p.add_argument("--data", help="TokenStore to train on")
    p.add_argument("--scores", help="ScoreStore of --data (from `rho1 score`)")
    p.add_argument("--reference", help="instead of --scores: reference model (HF name or path) run in the loop")
    p.add_argument("--ratio", type=float, help="fraction of tokens SLM keeps, in (0, 1] (default 0.6)")
    p.add_argument("--score", choices=["excess", "reference", "learner", "random"], help="selection score")
    p.add_argument("--selection-scope", choices=["micro", "global"],
                   help="rank each process's micro-batch (micro) or all processes' tokens of the step at once (global)")
    p.add_argument("--model", help="HF causal LM name or path to start from")
    p.add_argument("--model-preset", choices=["nano", "tiny", "small"], help="fresh model size (default tiny)")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="windows per micro-batch per process")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--max-tokens", type=int, help="token budget (dropped tokens count as seen)")
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--loss-impl", choices=["auto", "logits"],
                   help="auto: chunked loss from the head's input when the head is plain linear (less memory, no "
                        "head backward for unselected tokens); logits: full logits (default auto)")
    p.add_argument("--eval-data", nargs="+", help="held-out TokenStores")
    p.add_argument("--eval-scores", nargs="+", help="ScoreStores of --eval-data, same order ('' for none)")
    p.add_argument("--eval-every", type=int, help="evaluate every N tokens")
    p.add_argument("--eval-max-windows", type=int)
    p.add_argument("--save-every", type=int, help="checkpoint every N tokens")
    p.add_argument("--log-every", type=int, help="log every N steps")
    p.add_argument("--keep-last", type=int, help="resumable checkpoints to keep (default 3)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in --out (same command plus this flag)")
    p.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip a step whose loss or gradient is NaN/inf instead of stopping")


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="SLM at several ratios and with each score function; table and plot (Fig. 9)")
    p.add_argument("--out", "-o", default="runs/sweep", help="sweep directory (one run per folder)")
    p.add_argument("--ratios", type=float, nargs="+", help="selection ratios (default 0.2 0.4 0.6 0.8 1.0)")
    p.add_argument("--score-functions", nargs="+", choices=["excess", "reference", "learner", "random"],
                   help="score functions compared at --ablation-ratio (default all)")
    p.add_argument("--ablation-ratio", type=float, default=0.6)
    p.add_argument("--target", help="eval metric to compare (default: the first eval store's target_loss)")
    p.add_argument("--answers", help="GSM8K-style jsonl: also each run's few-shot answer accuracy")
    p.add_argument("--shots", type=int, help="exemplars per prompt, the first problems of --answers (default 2)")
    p.add_argument("--answers-limit", type=int, help="problems evaluated (default 100)")
    _train_options(p)


def _add_dynamics(sub):
    p = sub.add_parser("dynamics", help="per-token held-out losses over a run's checkpoints and the four classes")
    p.add_argument("run", help="run directory of `rho1 train` (saved with --save-every and --keep-last 0)")
    p.add_argument("--data", required=True, help="held-out TokenStore")
    p.add_argument("--out", "-o", help="output folder (default RUN/dynamics)")
    p.add_argument("--seq-len", type=int, help="default: the run's")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-windows", type=int, help="held-out windows evaluated (default 64, 0 = all)")
    p.add_argument("--threshold", type=float, help="|dL| above which a token is H->L or L->H (default 0.2)")
    p.add_argument("--no-start", dest="include_start", action="store_false", default=None,
                   help="leave out the model the run started from")


def _add_view(sub):
    p = sub.add_parser("view", help="HTML page of text with each token coloured by its selection")
    p.add_argument("--data", help="TokenStore whose text is shown (corpus or held-out)")
    p.add_argument("--model", nargs="+", help="one model, or several checkpoints side by side (selection tendency)")
    p.add_argument("--run", help="instead of --model: the run's checkpoints at 0/33/66/100%% of training")
    p.add_argument("--scores", help="ScoreStore of --data (reference losses)")
    p.add_argument("--reference", help="instead of --scores: a reference model run on --data")
    p.add_argument("--out", "-o", help="HTML file to write (default view.html)")
    p.add_argument("--ratio", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--windows", type=int, help="windows of --seq-len tokens shown (default 2)")
    p.add_argument("--start", type=int, help="first window shown")


def _add_report(sub):
    p = sub.add_parser("report", help="one self-contained HTML file comparing runs")
    p.add_argument("runs", nargs="+", help="run directories of `rho1 train`")
    p.add_argument("--out", "-o", help="HTML file to write (default report.html)")
    p.add_argument("--target", help="eval metric compared (default: the first eval store's target_loss)")
    p.add_argument("--baseline", help="run (folder name) token efficiency is measured against (default: first CLM)")


def _add_score(sub):
    p = sub.add_parser("score", help="reference losses of every token of a TokenStore -> ScoreStore")
    p.add_argument("--data", help="TokenStore to score")
    p.add_argument("--model", help="reference model (HF name or path, e.g. RUN/final)")
    p.add_argument("--out", "-o", help="ScoreStore directory to write")
    p.add_argument("--seq-len", type=int, help="window length; must match training (default 256)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"])
    p.add_argument("--chunk-windows", type=int, help="windows per unit of work (split across processes, resumed)")
    p.add_argument("--trust-remote-code", action="store_true", default=None)


def _add_eval(sub):
    p = sub.add_parser("eval", help="held-out loss of a model (all / target / selected / unselected tokens) and "
                       "math answer accuracy")
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", help="held-out TokenStores")
    p.add_argument("--answers", help="GSM8K-style jsonl (question, answer ending in '#### N'): few-shot accuracy")
    p.add_argument("--shots", type=int, default=0, help="solved exemplars in each prompt")
    p.add_argument("--exemplars", help="jsonl the exemplars come from (default: the first --shots of --answers, "
                   "left out of the evaluation)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N problems (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--generations", help="JSONL to write every prompt, generation, extracted and gold answer to")
    p.add_argument("--scores", nargs="+", help="their ScoreStores, same order, to split selected/unselected")
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trust-remote-code", action="store_true")


def _add_demo(sub):
    p = sub.add_parser("demo", help="every stage end to end on the embedded demo data")
    p.add_argument("--preset", choices=sorted(DEMO_PRESETS), default="default",
                   help="default (a few minutes on 2 CPU cores) or quick (under a minute)")
    p.add_argument("--out", "-o", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ratio", type=float)


def run_eval(args) -> dict:
    import numpy as np

    from rho1.data.store import ScoreStore, TokenStore
    from rho1.evaluate import fixed_selection, linear_head_of, summarize, token_losses
    from rho1.model import check_model_fits, load_model

    model = load_model(args.model, args.trust_remote_code)
    results = {}
    if not (args.data or args.answers):
        raise ValueError("rho1 eval needs --data HELDOUT_STORE (losses) and/or --answers FILE.jsonl (accuracy)")
    if args.answers:
        from rho1.accuracy import AnswerConfig, answer_accuracy
        from rho1.data.tokenizer import load_tokenizer

        cfg = AnswerConfig(args.answers, args.shots, args.exemplars, args.limit, args.max_new_tokens,
                           args.batch_size, args.generations)
        results["answers"] = answer_accuracy(model, load_tokenizer(args.model, args.trust_remote_code), cfg)
    args.data = args.data or []
    scores_paths = args.scores or [""] * len(args.data)
    if len(scores_paths) != len(args.data):
        raise ValueError("--scores must name one ScoreStore per --data store ('' for none)")
    for path, scores_path in zip(args.data, scores_paths):
        store = TokenStore.open(path)
        check_model_fits(model, store, args.model)
        scores = ScoreStore.open(scores_path, store) if scores_path else None
        losses = token_losses(model, store, args.seq_len, args.batch_size, progress=True, desc=Path(path).name,
                              head_of=linear_head_of(model, store, args.seq_len))
        selected = None
        if scores is not None:
            selected = fixed_selection(losses, np.asarray(scores.scores, np.float32), args.ratio)
        results[Path(path).name] = summarize(losses, store, None if scores is None else scores.scores, selected)
    print(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rho1", description="Selective Language Modeling (Rho-1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prepare, _add_train, _add_score, _add_eval, _add_sweep, _add_dynamics, _add_view, _add_report,
                _add_demo):
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--config", help="YAML file of options (flags override it)")
    args = parser.parse_args(argv)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        if args.command == "prepare":
            from rho1.data.prepare import PrepareConfig, prepare

            cfg = _build(PrepareConfig, args)
            if not cfg.sources:
                parser.error("prepare needs at least one source")
            prepare(cfg)
        elif args.command == "train":
            from rho1.train import TrainConfig, train

            train(_build(TrainConfig, args))
        elif args.command == "score":
            from rho1.score import ScoreConfig, score

            score(_build(ScoreConfig, args))
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "sweep":
            from rho1.sweep import SweepConfig, sweep
            from rho1.train import TrainConfig

            keys = ("ratios", "score_functions", "ablation_ratio", "target", "answers", "shots", "answers_limit")
            sweep(SweepConfig(train=_build(TrainConfig, argparse.Namespace(
                **{k: v for k, v in vars(args).items() if k not in ("out", *keys)})), out=args.out,
                **{k: getattr(args, k) for k in keys if getattr(args, k) is not None}))
        elif args.command == "dynamics":
            from rho1.analysis.dynamics import DynamicsConfig, compute_dynamics

            compute_dynamics(_build(DynamicsConfig, args))
        elif args.command == "view":
            from rho1.analysis.viewer import ViewConfig, run_checkpoint_columns, view

            if args.run:
                args.model = run_checkpoint_columns(args.run)
            view(_build(ViewConfig, args))
        elif args.command == "report":
            from rho1.analysis.report import ReportConfig, report

            report(_build(ReportConfig, args))
        elif args.command == "demo":
            from rho1.pipeline import DemoConfig, run_demo

            run_demo(_build(DemoConfig, args, base=DEMO_PRESETS[args.preset]))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"rho1 {args.command}: error: {err}", file=sys.stderr)
        return 2
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, leave the process group together: a process that exits while
    another still holds the connection can make gloo abort it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
