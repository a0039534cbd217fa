"""Run folders: one run at a time, one command and one set of settings each.

Beside the outputs of the command that made it, a run folder holds:

``run.lock``     locked (``flock``) by the run working in the folder, for its whole life; the OS
                 drops the lock when that process ends, however it ends, so a killed run leaves
                 no stale lock. Its text names the holder: pid, host, start time and command.
``run.json``     the command the folder belongs to and the checkpoints it started from (path,
                 step and SHA-256 of the weights of each).
``config.json``  the resolved settings, written once the run's checks have passed.

A run refuses, in one line, a folder that another run holds, that belongs to another command,
or that holds files but no ``run.json``. A rerun in its own folder refuses settings or input
checkpoints that differ from the saved ones, except the few of :data:`RESUMABLE`.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from simclrv2 import distributed
from simclrv2.config import ConfigError, flag_name, to_dict
from simclrv2.engine.checkpoint import CHECKPOINT_DIR, step_checkpoints, write_json

LOCK_FILE = "run.lock"
RECORD_FILE = "run.json"
CONFIG_FILE = "config.json"

RESUMABLE = frozenset({
    "runtime.run_dir", "runtime.resume", "runtime.max_steps", "runtime.device", "runtime.channels_last",
    "runtime.compile", "runtime.num_threads", "data.num_workers", "runtime.progress", "runtime.log_every_steps",
    "runtime.checkpoint_steps", "runtime.keep_checkpoint_max", "runtime.on_nonfinite", "runtime.max_skipped_steps",
    "data.eval_batch_size", "data.skip_bad_images",
})
"""Settings (``section.option``) a rerun may change: they say where, how fast and how far the run
goes and what it prints or keeps, not what it computes.

- ``run_dir`` names this folder (any spelling of its path); ``resume`` is on in every resume.
- ``max_steps`` is where this invocation stops; the schedule follows ``--train-epochs``/``--train-steps``.
- ``device``, ``channels_last``, ``compile``, ``num_threads``, ``num_workers``: the same arithmetic on
  other hardware or with other parallelism (equal up to rounding; batches and augmentations are
  seeded per step and image, not per worker), so a run can move to another machine.
- ``progress``, ``log_every_steps``, ``checkpoint_steps``, ``keep_checkpoint_max``: what is shown,
  logged and kept.
- ``on_nonfinite``, ``max_skipped_steps``: what a non-finite step does; after such a stop the advice is to resume
  with ``skip``.
- ``eval_batch_size``: evaluation only, whose counts do not depend on the batch.
- ``skip_bad_images``: the advice of a run stopped by an unreadable image; the steps before it
  read no such image, so turning it on changes nothing they computed.

Everything else is compared: the model, data, optimiser, label and stage options, the seed,
``precision`` and ``global_bn`` (both change the training arithmetic).
"""

INPUTS = ("checkpoint", "student_init")
"""Options naming input checkpoints: compared by the content they resolve to (``run.json``), not
by their spelling, so that a rerun from another folder, or naming the file a folder resolves to,
is the same run; a run folder whose newest checkpoint moved on is a different input."""


class StaleInputs(ConfigError):
    """The folder's run started from other input checkpoints; its settings are the same."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes

    def __reduce__(self) -> tuple:  # rank 0 broadcasts it to the other ranks
        return StaleInputs, (str(self), self.changes)


# ----------------------------------------------------------------------------- the lock


class FolderLock:
    """An exclusive ``flock`` on ``run_dir/run.lock``, held until :meth:`release` or the process ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        if self.path.is_symlink():  # replaced, never followed
            self.path.unlink()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "a process that wrote no details"
            os.close(self.fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"--run-dir {run_dir}: cannot lock {self.path} ({err.strerror})") from None
            raise ConfigError(f"--run-dir {run_dir} is in use by another run ({_one_line(holder)}); wait for it to "
                              "end or choose another --run-dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, holder_text().encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = -1


def holder_text() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {shlex.join(sys.argv)}\n"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_HELD: list[FolderLock] = []


def releases_run_folders(run: Callable) -> Callable:
    """Decorator of a stage's ``run``: the folders it locks are released when it returns or fails
    (a pipeline's own lock outlives its stages')."""
    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = len(_HELD)
        try:
            return run(*args, **kwargs)
        finally:
            while len(_HELD) > depth:
                _HELD.pop().release()
    return wrapper


# ----------------------------------------------------------------------------- ownership


def claim(run_dir: Path, command: str, config: dict[str, Any], inputs: dict[str, Any], trains: bool) -> None:
    """Lock ``run_dir`` for this process's run of ``command`` and check that it may work there;
    record the command and inputs in ``run.json``. Call on the main rank only. ``trains``: the
    command resumes from checkpoints, so it may adopt a training run of an earlier version."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_foreign(run_dir, trains)  # before the lock file is made in a folder that is not a run's
    lock = FolderLock(run_dir)
    try:
        check_folder(run_dir, command, config, inputs, trains)
        write_json(run_dir / RECORD_FILE, {"command": command, "inputs": inputs})
    except BaseException:
        lock.release()
        raise
    _HELD.append(lock)


def name_run_dir(run_dir: Optional[str], command: str, is_main: bool) -> Path:
    """``--run-dir``, else ``runs/<command>-<time>``: one name for all ranks, announced by the main one."""
    if run_dir is None:
        stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        run_dir = str(Path("runs") / f"{command}-{stamp}")
        if is_main:
            print(f"writing to {run_dir}")
    return Path(run_dir)


def claim_run_folder(run_dir: Path, command: str, cfg: Any, inputs: dict[str, Any], trains: bool = False) -> None:
    """:func:`claim` on the main rank (only it locks); every rank raises its verdict (a refusal, or
    a folder that cannot be made or locked)."""
    distributed.decided_by_main(lambda: claim(run_dir, command, to_dict(cfg), inputs, trains))


def check_foreign(run_dir: Path, trains: bool) -> None:
    """Refuse a folder that holds files but no run record: not a simclrv2 run folder, unless it
    is a training run of a version before run records (``config.json`` and ``checkpoints``),
    which a training command may resume (the training loop checks the checkpoints' stage)."""
    names = {p.name for p in run_dir.iterdir()}
    others = sorted(names - {LOCK_FILE})
    if trains and {CONFIG_FILE, "checkpoints"} <= names:
        return
    if others and RECORD_FILE not in names:
        raise ConfigError(f"--run-dir {run_dir} holds files ({', '.join(others[:3])}) but no {RECORD_FILE}, so it is "
                          "not a simclrv2 run folder (or one of an older version); choose a new or empty folder")


def check_folder(run_dir: Path, command: str, config: dict[str, Any], inputs: dict[str, Any], trains: bool) -> None:
    """Refuse a folder of another command, and a run begun there (it has a ``config.json``) with
    other settings or inputs."""
    record = read_json(run_dir / RECORD_FILE)
    if record is None:
        check_foreign(run_dir, trains)  # again, now that no other run can be making the folder
        record = {"command": command, "inputs": inputs}  # new, or adopted: its inputs were not recorded
    if record.get("command") != command:
        raise ConfigError(f"--run-dir {run_dir} holds a {record.get('command')} run; {command} writes only into its "
                          "own folder: choose another --run-dir")
    saved = read_json(run_dir / CONFIG_FILE)
    if saved is None or not _work_kept(run_dir, command, trains):  # nothing to continue: settings may be corrected
        return
    settings = changed_settings(saved, config)
    inputs_changed = changed_inputs(record.get("inputs") or {}, inputs)
    if settings:
        raise ConfigError(f"--run-dir {run_dir} holds a {command} run made with other settings (saved -> now: "
                          f"{', '.join(settings + inputs_changed)}); rerun it with its own settings "
                          f"({run_dir / CONFIG_FILE}) or choose another --run-dir")
    if inputs_changed:
        raise StaleInputs(f"--run-dir {run_dir} holds a {command} run started from other inputs (saved -> now: "
                          f"{', '.join(inputs_changed)}); pass the saved checkpoint file if it still exists, or "
                          "choose another --run-dir", inputs_changed)


def _work_kept(run_dir: Path, command: str, trains: bool) -> bool:
    """Whether the folder holds work that a rerun would continue, so that its settings must not
    change: a training run's step checkpoints, those of a pipeline's stages, or (for ``evaluate``)
    the results written with its ``config.json``. A run that stopped before its first checkpoint
    (diverged, out of memory, bad data) may be rerun with the settings that fix it."""
    if trains:
        return bool(step_checkpoints(run_dir / CHECKPOINT_DIR))
    if command == "pipeline":
        return any(step_checkpoints(folder) for folder in run_dir.glob(f"*/**/{CHECKPOINT_DIR}"))
    return True


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _leaves(value, path + (key,)).items()}
    return {path: tree}


def _resumable(path: tuple[str, ...]) -> bool:
    return ".".join(path[-2:]) in RESUMABLE or path[-1] in INPUTS


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag old -> new`` for each option that differs and may not change on resume. Options
    only one side knows (added or removed in another version) are not compared."""
    old, new = _leaves(saved), _leaves(json.loads(json.dumps(now)))
    return [f"--{flag_name('.'.join(path))} {_show(old[path])} -> {_show(value)}" for path, value in new.items()
            if path in old and old[path] != value and not _resumable(path)]


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: the content a later stage builds
    on. Not the file's: a resumed run that saves its last step again writes other random states."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_identity(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What names an input checkpoint: its file, its step and its weights (SHA-256)."""
    return {"path": str(Path(path).resolve()), "step": ckpt.get("step"), "sha256": weights_sha256(ckpt["model"])}


def _describe(identity: Optional[dict[str, Any]]) -> str:
    if not identity:
        return "none"
    return f"{identity['path']} (step {identity.get('step')}, sha256 {identity['sha256'][:12]})"


def changed_inputs(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--option old -> new`` for each input checkpoint whose content differs."""
    return [f"--{name.replace('_', '-')} {_describe(saved.get(name))} -> {_describe(now.get(name))}"
            for name in sorted(set(saved) | set(now))
            if (saved.get(name) or {}).get("sha256") != (now.get(name) or {}).get("sha256")]


def is_stale(folder_name: str) -> bool:
    """Whether a folder is one that :func:`set_aside` renamed (``<name>.stale-<k>``)."""
    stem, _, k = folder_name.rpartition(".stale-")
    return bool(stem) and k.isdigit()


def set_aside(run_dir: Path) -> Path:
    """Rename a stale run folder to the first free ``<name>.stale-<k>``, keeping everything in it."""
    run_dir = Path(run_dir)
    lock = FolderLock(run_dir)  # nobody else may be using it
    try:
        k = 1
        while run_dir.with_name(f"{run_dir.name}.stale-{k}").exists():
            k += 1
        target = run_dir.with_name(f"{run_dir.name}.stale-{k}")
        run_dir.rename(target)
    finally:
        lock.release()
    return target


# ----------------------------------------------------------------------------- files


def read_json(path: Path) -> Optional[Any]:
    """A JSON file's content, None where it does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); repair or remove it, or choose another --run-dir") from None


