"""Tool commands beside the stages (conversion, export, reports): name -> (help, add_arguments, run).

Each ``run`` returns an exit code; bad input is reported as one line with exit code 2 (errors that
derive from ``CheckpointError``, such as ``ConversionError``, are reported by ``cli.main``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_BAD_INPUT = 2


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
          f"{describe_architecture(record['model_config'])}; {len(record['model'])} tensors -> {args.out}")
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
