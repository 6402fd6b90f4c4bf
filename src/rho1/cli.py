"""The `rho1` command: one subcommand per pipeline stage. Thin: parse, build the stage's config, call it.

Every subcommand takes ``--config FILE.yaml`` whose keys are the stage's config fields (``seq_len`` or
``seq-len``); flags given on the command line override the file. Nothing heavy is imported before the
options are read and checked, so `--help` and a refused option answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields

from rho1 import config as C


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


def _base_type(tp):
    """(element type, is a list) of a field type such as ``int | None`` or ``list[str]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_config_options(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a stage's config (``--seq-len`` for ``seq_len``), its help and choices from
    the field's metadata. Every default is None on the command line, so only given flags override."""
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        meta = f.metadata
        if meta.get("cli") is False or f.name in skip:
            continue
        base, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                              else None)
        shown = "" if default is None or default in ("", []) or base is bool else f" (default {default})"
        kwargs = {"help": (meta.get("help", "") + shown).replace("%", "%%"), "default": None}
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="*" if is_list else "?", **kwargs)
            continue
        if base is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            choices = meta.get("choices")
            kwargs.update(type=base, choices=list(choices() if callable(choices) else choices) if choices else None,
                          metavar=meta.get("metavar"), nargs="+" if is_list else None)
        names = [meta.get("flag", "--" + f.name.replace("_", "-")), *([meta["short"]] if "short" in meta else [])]
        parser.add_argument(*names, dest=f.name, **kwargs)


VERBS = {  # verb: (config, help)
    "prepare": (C.PrepareConfig, "tokenize text sources into a TokenStore"),
    "score": (C.ScoreConfig, "reference losses of every token of a TokenStore -> ScoreStore"),
    "train": (C.TrainConfig, "train a causal LM with the CLM or SLM objective"),
    "export": (C.ExportConfig, "static selection for any trainer: windows with labels -100 on dropped tokens (Parquet, "
               "datasets)"),
    "eval": (C.EvalConfig, "held-out loss of a model (all / target / selected / unselected tokens) and math answer "
             "accuracy"),
    "sweep": (C.SweepConfig, "SLM at several ratios, with each score function and rule; table and plot (Fig. 9)"),
    "dynamics": (C.DynamicsConfig, "per-token held-out losses over a run's checkpoints and the four classes"),
    "view": (C.ViewConfig, "HTML page of text with each token coloured by its selection"),
    "report": (C.ReportConfig, "one self-contained HTML file comparing runs"),
    "demo": (C.DemoConfig, "every stage end to end on the embedded demo data"),
    "verify": (C.VerifyConfig, "the full check of a TokenStore or ScoreStore: every file against its hash, every "
               "token id against the vocabulary (an open checks sizes and times only)"),
    "pipeline": (C.PipelineConfig, "the whole study on your own data from one recipe file: stores, reference, scores, "
                 "SLM and baselines, results and report, each stage cached by its inputs"),
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="rho1", description="Selective Language Modeling (Rho-1)")
    sub = root.add_subparsers(dest="command", required=True)
    for verb, (config_cls, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        add_config_options(p, config_cls)
        if verb == "sweep":  # and every `rho1 train` option but those the sweep sets itself
            add_config_options(p, C.TrainConfig, skip=("out", "objective", "rule"))
        if verb == "view":
            p.add_argument("--run", help="instead of --model: the run's checkpoints at 0/33/66/100%% of training")
        if verb == "demo":
            p.add_argument("--preset", choices=sorted(C.DEMO_PRESETS), default="default",
                           help="default (a few minutes on 2 CPU cores) or quick (under a minute)")
        if verb != "pipeline":  # whose recipe, its argument, is the YAML file
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
    base = C.DEMO_PRESETS[args.preset] if args.command == "demo" else None
    return _build(VERBS[args.command][0], args, base=base)


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
    if command == "export":
        from rho1.export import export

        return export(cfg)
    if command == "eval":
        from rho1.evaluate import evaluate_model

        results = evaluate_model(cfg)
        print(json.dumps(results, indent=2))
        return results
    if command == "sweep":
        from rho1.experiments.sweep import sweep

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
        from rho1.experiments.demo import run_demo

        return run_demo(cfg)
    if command == "verify":
        from rho1.data.store import verify_stores

        return verify_stores(cfg.stores)
    if command == "pipeline":
        if cfg.example:
            print(_example(), end="")
            return None
        from rho1.experiments.pipeline import run_pipeline

        return run_pipeline(C.load_recipe(cfg.recipe))
    raise ValueError(f"unknown command {command}")


def _example() -> str:
    from rho1.config.pipeline import EXAMPLE

    return EXAMPLE


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
    import signal

    signal.signal(signal.SIGINT, C.on_ctrl_c)
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
