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
from typing import Callable, Optional, Sequence

from simclrv2 import config as config_lib

EXIT_BAD_INPUT = 2

_STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("simclrv2.stages.pretrain", "Stage 1: contrastive pretraining on unlabeled images."),
    "finetune": ("simclrv2.stages.finetune", "Stage 2: fine-tune on few labels from a middle head layer."),
    "distill": ("simclrv2.stages.distill", "Stage 3: distill the fine-tuned teacher into a student on unlabeled images."),
    "linear-eval": ("simclrv2.stages.linear_eval", "Linear classifier on frozen features."),
    "evaluate": ("simclrv2.stages.evaluate", "Top-1 / top-5 accuracy of a checkpoint."),
    "pipeline": ("simclrv2.stages.pipeline", "Pretrain -> fine-tune -> distill with a supervised baseline and a report."),
}


# ----------------------------------------------------------------------------- tools
#
# Tool commands beside the stages (conversion, export, reports): name -> (help, add_arguments,
# run). Each ``run`` returns an exit code; bad input is reported as one line with exit code 2
# (errors that derive from ``CheckpointError``, such as ``ConversionError``, are reported by
# :func:`main`).


def _fail(command: str, err: Exception) -> int:
    print(f"simclrv2 {command}: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="official TF2 checkpoint prefix (DIR/ckpt-1000), a folder with a 'checkpoint' state "
                             "file, or a SavedModel folder")
    parser.add_argument("out", metavar="OUT", help="simclrv2 checkpoint (.pt) to write")
    parser.add_argument("--ft-proj-selector", type=int, default=None, metavar="K",
                        help="projection-head hidden the supervised head reads (official --ft_proj_selector); "
                             "default: 0 when the widths allow it, else -1")


def _convert(args: argparse.Namespace) -> int:
    from simclrv2.convert import convert_tf_checkpoint, describe_architecture

    model, record = convert_tf_checkpoint(args.checkpoint, args.out, ft_proj_selector=args.ft_proj_selector)
    source = record["config"]
    step = "" if source["source_global_step"] is None else f", global step {source['source_global_step']}"
    print(f"converted {source['source_format']} {args.checkpoint}{step}: "
          f"{describe_architecture(model.spec)}; {len(record['model'])} tensors -> {args.out}")
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from simclrv2.export import FORMATS

    parser.add_argument("checkpoint", metavar="CKPT_OR_RUN",
                        help="run folder, checkpoint .pt, .safetensors, exported folder, hf://ORG/NAME, or an "
                             "official TF checkpoint/SavedModel")
    parser.add_argument("out", metavar="OUT", help="file to write (a folder for --format hf)")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                        help="torchvision: state dict for torchvision.models.resnet* (width 1x, no SK); "
                             "safetensors: the whole model; onnx: images -> features, projection, logits "
                             "(pip install 'simclrv2[export]'); hf: a Hugging Face Hub folder (safetensors, "
                             "config.json, a model card with the run's eval.json results)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="ONNX input height and width; default: the size the checkpoint was trained on, "
                             "else 32 for the CIFAR stem and 224 otherwise")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT (atomically); a folder only if it is an earlier --format hf export")


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simclrv2.api import load_with_classes
    from simclrv2.export import ExportError, check_output, export_model, require_onnx

    source = Path(args.checkpoint)
    try:
        check_output(Path(args.out), args.fmt, args.force)  # before the (possibly long) load
        if args.fmt == "onnx":
            require_onnx()
        model, classes = load_with_classes(args.checkpoint)
        size = next(s for s in (args.image_size, model.image_size, 32 if model.encoder.cifar_stem else 224)
                    if s is not None)
        lines = export_model(model, args.out, args.fmt, image_size=size, force=args.force, classes=classes,
                             run_dir=source if source.is_dir() else None)
    except ExportError as err:
        return _fail("export", err)
    print("\n".join(lines))
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a stage run folder or a pipeline run folder")
    parser.add_argument("--out", default=None, help="HTML page to write (default RUN_DIR/report.html)")


def _report(args: argparse.Namespace) -> int:
    from simclrv2.engine.report import ReportError, write_html_report

    try:
        page, pngs = write_html_report(args.run_dir, args.out)
    except ReportError as err:
        return _fail("report", err)
    print(f"wrote {page} ({len(pngs)} figure(s) in {pngs[0].parent})" if pngs else f"wrote {page}")
    return 0


TOOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "convert-tf": ("Convert an official SimCLRv2 TensorFlow 2 checkpoint or SavedModel to a simclrv2 checkpoint.",
                   _convert_arguments, _convert),
    "export": ("Export a model as a torchvision state dict, safetensors, ONNX or a Hugging Face Hub folder.",
               _export_arguments, _export),
    "report": ("Training curves and the accuracy table of a run folder as PNGs and one HTML page.",
               _report_arguments, _report),
}


# ----------------------------------------------------------------------------- main


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
