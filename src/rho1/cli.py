"""The `rho1` command: one subcommand per pipeline stage. Thin: parse, build the stage's config, call it.

Every subcommand takes ``--config FILE.yaml`` whose keys are the stage's config fields (``seq_len`` or
``seq-len``); flags given on the command line override the file. Nothing heavy is imported before the
options are read and checked, so `--help` and a refused option answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from rho1 import config as C

SCORES = list(C.SCORE_NAMES)


def _build(config_cls, args: argparse.Namespace, base=None):
    """The stage config: defaults (or ``base``) < YAML --config < flags given on the command line."""
    names = {f.name for f in fields(config_cls)}
    cfg = base
    if getattr(args, "config", None):
        cfg = C.config_from_dict(config_cls, C.load_yaml(args.config), f"config file {args.config}", base)
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = C.config_from_dict(config_cls, given, "the command line", cfg)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def _threads(p):
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores not busy at start, "
                   "see README 'Threads')")


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="tokenize text sources into a TokenStore")
    p.add_argument("sources", nargs="*", help=".txt/.md files or folders, .jsonl, .parquet, folders written by "
                   "datasets' save_to_disk, or hf:NAME[:CONFIG] (datasets.load_dataset: a hub name or a local folder)")
    p.add_argument("--split", help="split read from Hugging Face datasets (default train)")
    p.add_argument("--out", "-o", help="TokenStore directory to write (default ./store); an existing TokenStore "
                   "is replaced only with --overwrite")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing TokenStore at --out (ScoreStores made from it stop matching it)")
    p.add_argument("--tokenizer", help="HF tokenizer name or path, or a TokenStore whose tokenizer to reuse")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE of this size on the sources (saved inside the store)")
    p.add_argument("--text-field", help="jsonl/parquet field holding the text (default: text)")
    p.add_argument("--template", help='format records, e.g. "Question: {question}\\nAnswer: {answer}" (a written '
                   '\\n or \\t is a newline or tab)')
    p.add_argument("--target-field", help="template field whose tokens count for target-domain metrics")
    p.add_argument("--trust-remote-code", action="store_true", default=None)


def _add_train(sub):
    p = sub.add_parser("train", help="train a causal LM with the CLM or SLM objective")
    p.add_argument("--out", "-o", help="run directory (default runs/train)")
    p.add_argument("--objective", choices=["clm", "slm"])
    _train_options(p)


def _train_options(p):
    """The options `train` and `sweep` share."""
    p.add_argument("--data", help="TokenStore to train on")
    p.add_argument("--scores", help="ScoreStore of --data (from `rho1 score`)")
    p.add_argument("--reference", help="instead of --scores: reference model (HF name or path) run in the loop")
    p.add_argument("--ratio", type=float, help="fraction of tokens SLM keeps, in (0, 1] (default 0.6)")
    p.add_argument("--score", choices=SCORES, help="selection score (default excess)")
    p.add_argument("--selection-scope", choices=["micro", "global"],
                   help="rank each process's micro-batch (micro) or all processes' tokens of the step at once (global)")
    p.add_argument("--model", help="HF causal LM name or path to start from (default: a fresh --model-preset model)")
    p.add_argument("--model-preset", choices=list(C.MODEL_PRESETS), help="size of the fresh model (default tiny)")
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
    p.add_argument("--precision", choices=list(C.PRECISIONS))
    p.add_argument("--loss-impl", choices=["auto", "logits"],
                   help="auto: chunked loss from the head's input when the head is plain linear (less memory, no "
                        "head backward for unselected tokens); logits: full logits (default auto)")
    p.add_argument("--eval-data", nargs="+", help="held-out TokenStores")
    p.add_argument("--eval-scores", nargs="+", help="ScoreStores of --eval-data, same order ('' for none)")
    p.add_argument("--eval-every", type=int, help="evaluate every N tokens")
    p.add_argument("--eval-max-windows", type=int)
    p.add_argument("--save-every", type=int, help="checkpoint every N tokens")
    p.add_argument("--log-every", type=int, help="log every N steps")
    p.add_argument("--keep-last", type=int, help="resumable checkpoints to keep (default 3; 0 keeps all)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in --out (same command plus this flag)")
    p.add_argument("--skip-nonfinite", action="store_true", default=None,
                   help="skip a step whose loss or gradient is NaN/inf instead of stopping")
    _threads(p)


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="SLM at several ratios and with each score function; table and plot (Fig. 9)")
    p.add_argument("--out", "-o", help="sweep directory, one run per folder (default runs/sweep)")
    p.add_argument("--ratios", type=float, nargs="+", help="selection ratios (default 0.2 0.4 0.6 0.8 1.0)")
    p.add_argument("--score-functions", nargs="+", choices=SCORES,
                   help="score functions compared at --ablation-ratio (default all)")
    p.add_argument("--ablation-ratio", type=float, help="the ratio score functions are compared at (default 0.6; "
                   "an excess-loss run at that ratio is added to compare against)")
    p.add_argument("--target", help="eval metric to compare (default: the first eval store's target_loss)")
    p.add_argument("--answers", help="GSM8K-style jsonl: also each run's few-shot answer accuracy")
    p.add_argument("--shots", type=int, help="exemplars per prompt, the first problems of --answers (default 2)")
    p.add_argument("--answers-limit", type=int, help="problems evaluated (default 100)")
    _train_options(p)


def _add_dynamics(sub):
    p = sub.add_parser("dynamics", help="per-token held-out losses over a run's checkpoints and the four classes")
    p.add_argument("run", help="run directory of `rho1 train` (saved with --save-every and --keep-last 0)")
    p.add_argument("--data", help="held-out TokenStore")
    p.add_argument("--out", "-o", help="output folder (default RUN/dynamics)")
    p.add_argument("--seq-len", type=int, help="default: the run's")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-windows", type=int, help="held-out windows evaluated (default 64, 0 = all)")
    p.add_argument("--threshold", type=float, help="|dL| above which a token is H->L or L->H (default 0.2)")
    p.add_argument("--no-start", dest="include_start", action="store_false", default=None,
                   help="leave out the model the run started from")
    _threads(p)


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
    p.add_argument("runs", nargs="*", help="run directories of `rho1 train`")
    p.add_argument("--out", "-o", help="HTML file to write (default report.html)")
    p.add_argument("--target", help="eval metric compared (default: the first eval store's target_loss)")
    p.add_argument("--baseline", help="run (folder name) token efficiency is measured against (default: first CLM)")


def _add_score(sub):
    p = sub.add_parser("score", help="reference losses of every token of a TokenStore -> ScoreStore")
    p.add_argument("--data", help="TokenStore to score")
    p.add_argument("--model", help="reference model (HF name or path, e.g. RUN/final)")
    p.add_argument("--out", "-o", help="ScoreStore directory to write (default ./scores)")
    p.add_argument("--seq-len", type=int, help="window length; must match training (default 256)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=list(C.PRECISIONS))
    p.add_argument("--chunk-windows", type=int, help="windows per unit of work (split across processes, resumed)")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    _threads(p)


def _add_eval(sub):
    p = sub.add_parser("eval", help="held-out loss of a model (all / target / selected / unselected tokens) and "
                       "math answer accuracy")
    p.add_argument("--model", help="checkpoint folder (e.g. RUN/final) or HF name")
    p.add_argument("--data", nargs="+", help="held-out TokenStores")
    p.add_argument("--answers", help="GSM8K-style jsonl (question, answer ending in '#### N'): few-shot accuracy")
    p.add_argument("--shots", type=int, help="solved exemplars in each prompt (default 0)")
    p.add_argument("--exemplars", help="jsonl the exemplars come from (default: the first --shots of --answers, "
                   "left out of the evaluation)")
    p.add_argument("--limit", type=int, help="evaluate the first N problems (default 0 = all)")
    p.add_argument("--max-new-tokens", type=int, help="default 256")
    p.add_argument("--generations", help="JSONL to write every prompt, generation, extracted and gold answer to")
    p.add_argument("--scores", nargs="+", help="their ScoreStores, same order, to split selected/unselected; the "
                   "split is the top --ratio of excess loss of the evaluated model")
    p.add_argument("--ratio", type=float, help="default 0.6")
    p.add_argument("--seq-len", type=int, help="default 256; must match the ScoreStores'")
    p.add_argument("--batch-size", type=int, help="default 16")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    _threads(p)


def _add_demo(sub):
    p = sub.add_parser("demo", help="every stage end to end on the embedded demo data")
    p.add_argument("--preset", choices=sorted(C.DEMO_PRESETS), default="default",
                   help="default (a few minutes on 2 CPU cores) or quick (under a minute)")
    p.add_argument("--out", "-o", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ratio", type=float)
    _threads(p)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="rho1", description="Selective Language Modeling (Rho-1)")
    sub = root.add_subparsers(dest="command", required=True)
    for add in (_add_prepare, _add_train, _add_score, _add_eval, _add_sweep, _add_dynamics, _add_view, _add_report,
                _add_demo):
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--config", help="YAML file of options, `option: value` per line (flags override it)")
    return root


def build_config(args: argparse.Namespace):
    """The checked config of the chosen stage, before anything heavy is imported."""
    if args.command == "sweep":
        keys = {f.name for f in fields(C.SweepConfig)} - {"train"}
        train_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in keys})
        train_args.config = None  # the YAML file holds sweep and train keys together
        data = C.load_yaml(args.config) if args.config else {}
        norm = {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}
        where = f"config file {args.config}"
        train = C.config_from_dict(C.TrainConfig, {k: v for k, v in norm.items() if k not in keys}, where)
        train = _build(C.TrainConfig, train_args, base=train)
        sweep = C.config_from_dict(C.SweepConfig, {k: v for k, v in norm.items() if k in keys}, where)
        sweep = C.config_from_dict(C.SweepConfig, {k: v for k, v in vars(args).items() if k in keys and v is not None},
                                   "the command line", sweep)
        sweep.train = train
        sweep.check()
        return sweep
    if args.command == "view" and args.run:
        return _build(C.ViewConfig, args)  # --model is filled from the run's checkpoints by run_stage
    config_cls = {"prepare": C.PrepareConfig, "train": C.TrainConfig, "score": C.ScoreConfig, "eval": C.EvalConfig,
                  "dynamics": C.DynamicsConfig, "view": C.ViewConfig, "report": C.ReportConfig,
                  "demo": C.DemoConfig}[args.command]
    base = C.DEMO_PRESETS[args.preset] if args.command == "demo" else None
    return _build(config_cls, args, base=base)


def run_stage(command: str, cfg, args: argparse.Namespace):
    if command == "prepare":
        from rho1.data.prepare import prepare

        return prepare(cfg)
    if command == "train":
        from rho1.train import train

        return train(cfg)
    if command == "score":
        from rho1.score import score

        return score(cfg)
    if command == "eval":
        from rho1.evaluate import evaluate_model

        results = evaluate_model(cfg)
        print(json.dumps(results, indent=2))
        return results
    if command == "sweep":
        from rho1.sweep import sweep

        return sweep(cfg)
    if command == "dynamics":
        from rho1.analysis.dynamics import compute_dynamics

        return compute_dynamics(cfg)
    if command == "view":
        from rho1.analysis.viewer import run_checkpoint_columns, view

        if args.run:
            cfg.model = run_checkpoint_columns(args.run)
        return view(cfg)
    if command == "report":
        from rho1.analysis.report import report

        return report(cfg)
    if command == "demo":
        from rho1.pipeline import run_demo

        return run_demo(cfg)
    raise ValueError(f"unknown command {command}")


def _one_sentence(err: BaseException) -> str:
    """An error as one line: OS errors name the file and what went wrong."""
    if isinstance(err, OSError) and not str(err).startswith("could not") and getattr(err, "strerror", None):
        name = f"{err.filename}: " if err.filename else ""
        fix = {"ENOSPC": "free some space and run the command again",
               "EACCES": "choose a location you can write to (or fix its permissions)",
               "EROFS": "choose a location on a writable file system",
               "ENOTDIR": "a path component is a file, not a folder; choose another path",
               "EISDIR": "a folder is in the way; choose another path"}
        import errno

        code = errno.errorcode.get(err.errno or 0, "")
        return f"{name}{err.strerror.lower()}" + (f"; {fix[code]}" if code in fix else "")
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as err:
        print(f"rho1 {args.command}: error: {_one_sentence(err)}", file=sys.stderr)
        return 2
    from rho1.threads import set_threads

    set_threads(getattr(cfg, "threads", None))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        run_stage(args.command, cfg, args)
    except (KeyboardInterrupt, C.Interrupted) as err:  # a stage that can resume says how in its Interrupted
        print(f"rho1 {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"rho1 {args.command}: error: {_one_sentence(err)}", file=sys.stderr)
        return 2
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, leave the process group together: a process that exits while
    another still holds the connection can make gloo abort it."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
