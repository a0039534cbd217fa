"""Hugging Face Hub: ``hf://ORG/NAME`` models and the folder that ``huggingface_hub.upload_folder`` publishes.

A model folder (``simclrv2 export --format hf RUN DIR``) holds ``model.safetensors`` (the state
dict, as ``--format safetensors`` writes it), ``config.json`` (the model's
``ModelSpec`` and mode, the image size, the class names, the registry name)
and ``README.md``, a model card with the run's results. ``simclrv2.load`` reads such a folder,
locally or as ``hf://ORG/NAME[@REVISION]`` through ``huggingface_hub.snapshot_download``, which
honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and a token from ``huggingface-cli login``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from simclrv2.engine.checkpoint import CheckpointError, atomic_write, process_alive, write_json, write_text
from simclrv2.models import ModelSpec, SimCLRv2Model

HF_PREFIX = "hf://"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
LIBRARY_NAME = "simclrv2"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_hf_reference(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder in the layout this module writes (not a run folder)."""
    return (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()


def parse_reference(reference: str) -> tuple[str, Optional[str]]:
    """``hf://ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
    repo_id, at, revision = reference[len(HF_PREFIX):].partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision):
        raise CheckpointError(f"{reference} is not a Hugging Face model reference; write hf://ORG/NAME or "
                              "hf://ORG/NAME@REVISION")
    return repo_id, revision or None


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError("hf:// models need the huggingface_hub package: pip install 'simclrv2[hub]'") from None
    return huggingface_hub


def load_reference(reference: str) -> tuple[SimCLRv2Model, Optional[list]]:
    """(model, class names) of ``hf://ORG/NAME``, from the local cache or the Hub."""
    repo_id, revision = parse_reference(reference)
    hf = _huggingface_hub()
    try:
        folder = hf.snapshot_download(repo_id, revision=revision, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME],
                                      library_name=LIBRARY_NAME)
    except (OSError, hf.errors.EntryNotFoundError) as err:
        detail = " ".join(str(err).split())  # offline and not cached, unknown repo or revision, no network
        raise CheckpointError(f"{reference}: cannot get the model from the Hugging Face Hub: {detail}") from None
    if not is_model_folder(Path(folder)):
        raise CheckpointError(f"{reference} has no {WEIGHTS_NAME} and {CONFIG_NAME}; it is not a simclrv2 model "
                              "(publish one with simclrv2 export --format hf)")
    return load_folder(Path(folder))


def load_folder(folder: Path) -> tuple[SimCLRv2Model, Optional[list]]:
    """(model, class names) of a model folder: the architecture from ``config.json``, the weights
    from ``model.safetensors``."""
    from safetensors.torch import load_file

    from simclrv2.export import model_from_spec, read_spec

    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        if not {"model_spec", "model_config"} & set(config):  # model_config: an export before format 3
            raise KeyError("model_spec")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not a simclrv2 model config ({err!r}); "
                              "re-export the model with simclrv2 export --format hf") from None
    spec, mode = read_spec(config.get("model_spec"), config.get("mode"), config.get("model_config"),
                           str(folder / CONFIG_NAME))
    model = model_from_spec(spec, mode, load_file(str(folder / WEIGHTS_NAME)), config.get("image_size"),
                            str(folder / WEIGHTS_NAME))
    return model, config.get("classes")


# ----------------------------------------------------------------------------- writing


def folder_config(model: SimCLRv2Model, classes: Optional[list]) -> dict[str, Any]:
    """The ``config.json`` of a model folder."""
    from simclrv2.models.registry import name_of

    spec = model.spec
    return {"library_name": LIBRARY_NAME, "model_name": name_of(spec), "model_spec": asdict(spec), "mode": model.mode,
            "image_size": model.image_size, "classes": list(classes) if classes else None}


def run_results(run_dir: Optional[Path]) -> Optional[dict[str, Any]]:
    """A run folder's ``eval.json`` with the dataset and split from its ``config.json``, if present."""
    if run_dir is None or not (run_dir / "eval.json").is_file():
        return None
    results = json.loads((run_dir / "eval.json").read_text())
    config_file = run_dir / "config.json"
    data = json.loads(config_file.read_text()).get("data", {}) if config_file.is_file() else {}
    return {**results, "dataset": data.get("dataset"), "split": results.get("split", data.get("eval_split"))}


def model_card(config: dict[str, Any], results: Optional[dict[str, Any]], name: str) -> str:
    """The model card: Hub metadata, the architecture, the run's results and how to load it."""
    from simclrv2.convert import describe_architecture

    registered = f" (`{config['model_name']}` in `simclrv2.list_models()`)" if config["model_name"] else ""
    lines = ["---", f"library_name: {LIBRARY_NAME}", "license: apache-2.0",
             "tags: [simclrv2, self-supervised-learning, image-classification]", "---", "",
             f"# {name}", "", f"A SimCLRv2 model (Chen et al., NeurIPS 2020) trained with simclrv2{registered}: "
             f"{describe_architecture(ModelSpec(**config['model_spec']))}; inputs of {config['image_size'] or 'any'} px.", ""]
    if results is not None:
        labels = results.get("labels") or (f"{results['num_labelled']} labelled images"
                                           if "num_labelled" in results else "see the training run")
        lines += ["## Results", "", "| dataset | split | labels | top-1 | top-5 | images |", "|---|---|---|---:|---:|---:|",
                  f"| {results.get('dataset')} | {results.get('split')} | {labels} | {results['top1']:.2f} | "
                  f"{results['top5']:.2f} | {results.get('num_examples')} |", ""]
    if config["classes"]:
        lines += [f"Classes, in the order of the logits: {', '.join(map(str, config['classes']))}.", ""]
    lines += ["## Usage", "", "```python", "import simclrv2", "",
              f'model = simclrv2.load("hf://ORG/{name}")  # the repository this folder was uploaded to',
              "features = model.embed(images)       # float RGB in [0, 1], (N, 3, H, W), no mean/std normalisation"]
    if config["model_spec"]["num_classes"]:
        lines.append("probabilities = model.predict(images)")
    if config["model_name"]:
        lines.append(f'model = simclrv2.create_model("{config["model_name"]}", pretrained="hf://ORG/{name}")  # the same')
    lines += ["```", "", f"Upload: `huggingface_hub.upload_folder(repo_id=\"ORG/{name}\", folder_path=\"{name}\")`.", ""]
    return "\n".join(lines)


def write_folder(model: SimCLRv2Model, out: Path, classes: Optional[list], run_dir: Optional[Path]) -> list[str]:
    """Write the model folder into a hidden temporary sibling of ``out``, then rename it to ``out``:
    a folder named ``out`` is always complete (an existing one is replaced only after the new one is)."""
    from simclrv2.export import safetensors_bytes

    config = folder_config(model, classes)
    weights = safetensors_bytes(model, classes)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        atomic_write(tmp / WEIGHTS_NAME, lambda handle: handle.write(weights))
        write_json(tmp / CONFIG_NAME, config)
        card = model_card(config, run_results(run_dir), out.name)
        write_text(tmp / CARD_NAME, card)
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [f"wrote {out}/ ({WEIGHTS_NAME}, {CONFIG_NAME}, {CARD_NAME})",
            f"publish it with huggingface_hub.upload_folder(repo_id='ORG/{out.name}', folder_path='{out}'); "
            f"load it with simclrv2.load('hf://ORG/{out.name}')"]


def recover_folder(out: Path) -> None:
    """Undo what a killed :func:`write_folder` of ``out`` left beside it: its half-written
    ``.NAME.tmp-PID`` folder is deleted, and its ``.NAME.old-PID`` (the previous export, set aside
    by :func:`_replace_folder`) goes back to ``out`` when ``out`` is missing, else is deleted.
    Folders of live processes are left alone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or process_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path)


def _replace_folder(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` goes aside first and is deleted after, so ``out``
    is at every moment absent, the old folder or the new one."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    if old.exists():
        shutil.rmtree(old)


def is_export_folder(path: Path) -> bool:
    """Whether ``path`` holds a folder this module wrote (what ``--force`` may replace)."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    written = {WEIGHTS_NAME, CONFIG_NAME, CARD_NAME}
    return isinstance(config, dict) and config.get("library_name") == LIBRARY_NAME and \
        {p.name for p in path.iterdir()} <= written | {".gitattributes", ".cache"}
