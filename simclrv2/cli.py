"""``simclrv2 <command>``: the stages, the pipeline and the tools, one sub-command each.

Every training command takes the flags of its config dataclass (``simclrv2 <command> --help``),
named after the official ``run.py`` flags with dashes. Errors in the input are reported as one
line naming the option or file and the fix, with exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Optional, Sequence

from simclrv2 import config as config_lib
from simclrv2.tools_cli import TOOLS

EXIT_BAD_INPUT = 2

_STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("simclrv2.stages.pretrain", "Stage 1: contrastive pretraining on unlabeled images."),
    "finetune": ("simclrv2.stages.finetune", "Stage 2: fine-tune on few labels from a middle head layer."),
    "distill": ("simclrv2.stages.distill", "Stage 3: distill the fine-tuned teacher into a student on unlabeled images."),
    "linear-eval": ("simclrv2.stages.linear_eval", "Linear classifier on frozen features."),
    "evaluate": ("simclrv2.stages.evaluate", "Top-1 / top-5 accuracy of a checkpoint."),
    "pipeline": ("simclrv2.stages.pipeline", "Pretrain -> fine-tune -> distill with a supervised baseline and a report."),
}


def _bad_input_types() -> tuple[type, ...]:
    from simclrv2.data import DataError
    from simclrv2.engine.checkpoint import CheckpointError

    return (config_lib.ConfigError, DataError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simclrv2", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    defaults = (f"Defaults shown are those of a run without --preset: the {config_lib.default_preset()!r} preset, "
                f"which --preset auto picks for the default --dataset {config_lib.DataConfig().dataset}; "
                "--preset NAME, or another --dataset, changes them. On/off options take true/false, yes/no or "
                "1/0, and alone mean true.")
    for name, (_, help_text) in _STAGES.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text} {defaults}")
        config_lib.add_config_arguments(p, name)
    for name, (help_text, add_arguments, _) in TOOLS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
    return parser


def _one_line(err: Exception) -> str:
    """The error's own message; an error re-raised from a DataLoader worker carries the worker's
    traceback in its text, whose last line is that message."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and any("Traceback" in line for line in lines):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(lines)


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Warnings printed like the command's errors: one line, without Python's source echo."""
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"simclrv2 {command}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad_input = _bad_input_types()
    from simclrv2 import distributed
    from simclrv2.engine.trainer import TrainingStopped

    try:
        with _one_line_warnings(args.command):
            if args.command in TOOLS:
                return TOOLS[args.command][2](args)
            import importlib

            cfg = config_lib.resolve(args.command, args)
            importlib.import_module(_STAGES[args.command][0]).run(cfg)
            distributed.barrier()  # no rank tears its process group down while another still uses it
            return 0
    except bad_input as err:
        print(f"simclrv2 {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as err:  # every rank agreed to stop at the same step
        print(f"simclrv2 {args.command}: {err}", file=sys.stderr)
        distributed.barrier()
        return err.exit_code
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
