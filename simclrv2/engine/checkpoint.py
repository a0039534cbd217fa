"""Checkpoints: atomic writes, keep-last-K rotation, safe loading and corrupt-file fallback.

Format (``FORMAT_VERSION`` 3), a dict of tensors and plain Python values only, so that it loads
with ``torch.load(path, weights_only=True)``:

``format_version``  int
``stage``           "pretrain" | "finetune" | "distill" | "linear-eval"
``model``           the model's ``state_dict`` (no DDP/compile prefixes)
``model_spec``      the architecture, ``asdict`` of the model's :class:`~simclrv2.models.ModelSpec`
``mode``            "pretrain" | "finetune", the model's forward mode
``config``          the run's resolved configuration
``optimizer``       optimiser state, ``step``/``epoch``/``batch_in_epoch`` the position reached,
                    ``images_per_step``/``steps_per_epoch`` the global batch and epoch length
``rank_randomness`` per rank: Python, NumPy, torch and CUDA generator states and the stage's own
                    generators (format 1 had one ``rng`` entry, rank 0's)
``state``           other state dicts (EMA model, memory queue, augmentation generator, ...)
``metrics``         the last logged metrics

Format 2 recorded the architecture and mode together as ``model_config``, with ``depth`` for
``resnet_depth``; :func:`read_model_record` still reads it.

Files: ``checkpoints/ckpt-<step>.pt``, the newest also reachable as ``checkpoints/last.pt`` (a
symbolic link, or a copy where links are not supported). A checkpoint never holds NaN or infinite
floating-point values: :func:`save_checkpoint` refuses to write them and :func:`load_checkpoint`
to read them, so the newest checkpoint is always one a run can continue from.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import numpy as np
import torch

from simclrv2 import distributed
from simclrv2.config import to_dict
from simclrv2.models import ModelSpec, SimCLRv2Model

FORMAT_VERSION = 3
CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.pt"
_STEP_FILE = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the requested model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")


def _temp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it; the PID tells whose it is."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (those whose process is
    gone) and return them. A live process's file is kept: it may still be renamed into place.
    PIDs are only meaningful on this host; that is enough because a checkpoint folder has one
    writer, rank 0 of the one run that holds the folder, which calls this before it writes."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if (m := _TEMP_FILE.match(p.name)) and not process_alive(int(m.group(1)))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(handle)`` into a temporary file in the same folder, fsync, then rename over ``path``:
    readers see the old file or the whole new one, never a torn one. On any error the temporary
    file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) through :func:`atomic_write`: a link of that name is replaced, never followed."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON through :func:`write_text`."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def _point_last(ckpt_dir: Path, target: Path) -> None:
    """Make ``last.pt`` name ``target`` atomically (a relative symlink, else a copy)."""
    last = ckpt_dir / LAST_NAME
    tmp = _temp_path(last)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(target.name, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, last)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(ckpt_dir)


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def _float_tensors(state: Any, name: str = ""):
    """``(dotted name, tensor)`` for every floating-point tensor inside nested dicts and lists."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _float_tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _float_tensors(value, f"{name}.{i}")
    elif torch.is_tensor(state) and (state.is_floating_point() or state.is_complex()):
        yield name, state


def nonfinite_entries(state: Any) -> list[str]:
    """Names of the tensors in ``state`` that hold a NaN or an infinity; one wait per device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in _float_tensors(state):
        by_device.setdefault(tensor.device, []).append((name, tensor))
    bad = []
    for named in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
        bad += [name for (name, _), ok in zip(named, finite) if not ok]
    return bad


def _listed(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class NonFiniteState(CheckpointError):
    """A state to save holds NaN or infinite values (training diverged)."""


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """Write ``ckpt-<step>.pt`` atomically, point ``last.pt`` at it and keep the newest ``keep``.

    A state with non-finite values is refused (:class:`NonFiniteState`) and nothing is written:
    a run resumed from it could only fail again. Temporary files of killed writers are removed.
    """
    bad = nonfinite_entries(state)
    if bad:
        raise NonFiniteState(f"non-finite values in {_listed(bad)} at step {step}")
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    path = ckpt_dir / f"ckpt-{step:09d}.pt"
    remove_stale_temp_files(ckpt_dir)
    atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    _point_last(ckpt_dir, path)
    for old in step_checkpoints(ckpt_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


_UNREADABLE_FIX = "; delete it or pass another ckpt-*.pt"
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _load_failure(path: Path, err: Exception) -> str:
    """``torch.load``'s error as one line, without PyTorch's advice to retry with
    ``weights_only=False``: unsafe, and useless for a file that is merely truncated or corrupt."""
    if isinstance(err, OSError):
        return f"cannot read checkpoint {path} ({err.strerror or err}){_UNREADABLE_FIX}"
    text = str(err)
    blocked = _BLOCKED_GLOBAL.search(text)  # a well-formed pickle that names code: refused, not broken
    if blocked:
        return (f"cannot load checkpoint {path} safely: it holds {blocked.group(1)}, not only tensors and plain "
                "values; load only checkpoints written by simclrv2")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        reason = "the file is empty"
    elif head != b"PK\x03\x04":  # torch.save writes zip archives
        reason = "not a PyTorch zip archive"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
        line = detail.group(1) if detail else (text.strip().splitlines() or [type(err).__name__])[0]
        reason = line.split(". ")[0].rstrip(".")
    return (f"checkpoint {path} is unreadable (truncated, corrupt or not a simclrv2 checkpoint: {reason})"
            f"{_UNREADABLE_FIX}")


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format version."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --checkpoint a .pt file or a run folder")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated, corrupt or unsafe files
        raise CheckpointError(_load_failure(path, err)) from err
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a simclrv2 checkpoint (no 'model' entry)")
    version = obj.get("format_version")
    if version is None or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this simclrv2 reads up to {FORMAT_VERSION}")
    bad = nonfinite_entries(obj)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values ({_listed(bad)}): it was written after "
                              f"training diverged{_UNREADABLE_FIX}")
    return obj


def latest_valid_checkpoint(run_dir: Path, map_location: Any = "cpu",
                            fix: str = "delete them to start the run again, or use another --run-dir"
                            ) -> Optional[tuple[Path, dict[str, Any]]]:
    """Newest loadable step checkpoint in ``run_dir``, or None where there is none at all.

    Unreadable newer ones are skipped with a warning. If none can be read, CheckpointError (ending
    with ``fix``): starting afresh would overwrite a run whose checkpoints may only need repair.
    """
    found = step_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    skipped: list[str] = []
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointError as err:
            skipped.append(str(err).removesuffix(_UNREADABLE_FIX))
            continue
        for problem in skipped:
            warnings.warn(f"{problem}; skipping it and falling back to {path.name}")
        return path, ckpt
    if found:
        raise CheckpointError(f"no checkpoint in {found[0].parent} can be read ({len(found)} tried, the newest: "
                              f"{skipped[0]}); {fix}")
    return None


def latest_checkpoint_of_all_ranks(run_dir: Path, map_location: Any = "cpu") -> Optional[tuple[Path, dict[str, Any]]]:
    """:func:`latest_valid_checkpoint` as rank 0 finds it, loaded on every rank.

    Ranks never choose on their own: on a shared filesystem a new file may be visible on one node
    before another. A rank that cannot read rank 0's choice stops every rank with its reason.
    """
    found: Optional[tuple[Path, dict[str, Any]]] = None

    def choose() -> Optional[Path]:
        nonlocal found
        found = latest_valid_checkpoint(run_dir, map_location)
        return None if found is None else found[0]

    path = distributed.decided_by_main(choose)
    if path is None:
        return None
    problem = None
    if found is None:  # another rank than 0
        try:
            found = path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            problem = (f"rank {distributed.rank()} cannot read {path}, the checkpoint rank 0 resumes from ({err}); put "
                       "--run-dir on a filesystem that every node reads the same")
    problems = [p for p in distributed.all_gather_object(problem) if p]
    if problems:
        raise CheckpointError(problems[0])
    return found


def resolve_checkpoint(path_or_run_dir: str) -> Path:
    """A ``.pt`` file as given, or a run folder's newest valid checkpoint (this process's own
    look; under a process group use :func:`resolve_checkpoint_of_all_ranks`)."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        found = latest_valid_checkpoint(path, fix="pass --checkpoint another run folder or a .pt file")
        if found is None:
            raise CheckpointError(f"run folder {path} holds no valid checkpoint under {CHECKPOINT_DIR}/")
        return found[0]
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path} does not exist; pass a .pt file or a run folder")
    return path


def resolve_checkpoint_of_all_ranks(path_or_run_dir: str) -> Path:
    """:func:`resolve_checkpoint` as rank 0 sees it, on every rank: a collective, for the stages,
    whose ranks must all start from one file."""
    return distributed.decided_by_main(lambda: resolve_checkpoint(path_or_run_dir))


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch and (once CUDA is in use) the current GPU's generator states as
    checkpoint-safe values. Only this process's GPU: a run may resume where fewer are visible."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    # Only in runs that use the GPU (no CUDA context is made just for this).
    cuda = state.get("cuda") if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible then
        index = torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


# ----------------------------------------------------------------------------- the model a checkpoint holds


def checkpoint_meta(spec: ModelSpec, mode: str, cfg: Any, image_size: int, classes: Optional[list]) -> dict[str, Any]:
    """What a stage's checkpoints record to rebuild its model and know its data."""
    return {"model_spec": asdict(spec), "mode": mode, "config": to_dict(cfg), "image_size": image_size,
            "classes": list(classes) if classes else None}


def read_model_record(ckpt: dict[str, Any]) -> Optional[tuple[ModelSpec, str]]:
    """(architecture, mode) a checkpoint records, or None where it records none."""
    if "model_spec" in ckpt:
        return ModelSpec(**ckpt["model_spec"]), ckpt.get("mode", "pretrain")
    if ckpt.get("model_config"):
        return read_format2_model_config(ckpt["model_config"])
    return None


def read_format2_model_config(config: dict[str, Any]) -> tuple[ModelSpec, str]:
    """Format 2's ``model_config``: the builder's arguments of then (``depth``, and in early
    checkpoints ``zero_init_logits``, an initialisation choice) with the mode."""
    fields = dict(config)
    mode = fields.pop("mode", "pretrain")
    fields.pop("zero_init_logits", None)
    fields["resnet_depth"] = fields.pop("depth")
    return ModelSpec(**fields), mode


def load_model(path_or_run: str, num_classes: Optional[int] = None) -> tuple[SimCLRv2Model, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (safely).

    ``num_classes`` replaces the supervised head with a new one of that size (the checkpoint's own
    head is then not loaded, as the official fine-tuning excludes ``head_supervised``).
    """
    path = resolve_checkpoint(path_or_run)
    ckpt = load_checkpoint(path)
    try:
        record = read_model_record(ckpt)
    except (TypeError, KeyError) as err:
        raise CheckpointError(f"{path} records an architecture this simclrv2 cannot read ({err})") from None
    if record is None:
        raise CheckpointError(f"{path} records no model_spec; was it written by simclrv2?")
    spec, mode = record
    state = ckpt["model"]
    if num_classes is not None and num_classes != spec.num_classes:
        spec = replace(spec, num_classes=num_classes)
        state = {k: v for k, v in state.items() if not k.startswith("supervised_head.")}
    model = SimCLRv2Model.from_spec(spec)
    model.mode = mode
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{path} does not fit its recorded architecture: {detail}") from None
    missing = [k for k in missing if not k.startswith("supervised_head.")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit its recorded architecture: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model, ckpt
