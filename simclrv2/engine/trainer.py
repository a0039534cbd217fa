"""The one training loop that every stage shares.

A stage describes its work as a :class:`TrainTask` (model, optimiser, batches, a step function
returning the loss, optional hooks) and :func:`train` runs it: learning-rate schedule, mixed
precision, non-finite checks, logging, progress bar, checkpoints every N steps and at each epoch
end, exact resume, and a clean checkpoint-and-exit on SIGTERM/SIGINT.

A step is taken only when its loss and gradients are finite on every rank (with fp16 loss scaling
the GradScaler skips overflowing gradients itself), and no checkpoint is written with non-finite
values, so the newest checkpoint is always one to resume from.
"""
from __future__ import annotations

import hashlib
import json
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from simclrv2 import distributed
from simclrv2.config import RuntimeConfig, save_config
from simclrv2.data.loader import worker_died
from simclrv2.engine.checkpoint import (CHECKPOINT_DIR, CheckpointError, NonFiniteState, capture_rng,
                                        latest_checkpoint_of_all_ranks, read_model_record, remove_stale_temp_files,
                                        restore_rng, save_checkpoint, step_checkpoints, write_text)
from simclrv2.engine.logging import MetricsLogger
from simclrv2.engine.runtime import Runtime, unwrap

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun the command to resume
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 74  # EX_IOERR: a checkpoint could not be written
INTERRUPTED_MARKER = "interrupted.json"  # in the run folder while the run is stopped by a signal, resumable


class TrainingStopped(RuntimeError):
    """Training ended early; ``exit_code`` tells the shell why."""

    exit_code = 1


class Interrupted(TrainingStopped):
    exit_code = EXIT_INTERRUPTED


class NonFiniteLoss(TrainingStopped):
    """A non-finite loss, gradient or state to save (training diverged)."""

    exit_code = EXIT_NONFINITE


class SaveFailed(TrainingStopped):
    exit_code = EXIT_SAVE_FAILED


class WorkerDied(TrainingStopped):
    """A DataLoader worker process died (often killed by the OOM killer)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class GeneratorState:
    """Lets a ``torch.Generator`` (augmentation randomness) travel in checkpoints."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["state"]
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved)
            return
        # CPU and CUDA generators keep differently sized states: the checkpoint comes from a run
        # that drew its augmentation on the GPU (the stages now draw on the host on every device).
        warnings.warn(f"the checkpoint's augmentation generator ran on another device type than this run's "
                      f"{self.generator.device.type} (GPU runs drew augmentations on the GPU before they were "
                      "drawn on the host); it is reseeded from the saved state, so augmentations differ from an "
                      "uninterrupted run")
        self.generator.manual_seed(int.from_bytes(hashlib.sha256(saved.numpy().tobytes()).digest()[:8], "little"))


class BatchSource(Protocol):
    """Batches in a fixed order per epoch, restartable at a batch index (see ``simclrv2.data``)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self): ...


@dataclass
class TrainTask:
    """Everything the loop needs from a stage."""

    stage: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: BatchSource
    step_fn: Callable[[Any, int], tuple[torch.Tensor, dict[str, Any]]]
    lr_fn: Callable[[int], float]
    total_steps: int
    images_per_step: int
    checkpoint_meta: dict[str, Any]
    after_step: Optional[Callable[[int], None]] = None
    end_of_epoch: Optional[Callable[[int], dict[str, Any]]] = None
    stateful: dict[str, Stateful] = field(default_factory=dict)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _batch_norm_statistics(task: TrainTask) -> list[torch.Tensor]:
    """Running statistics (and counters) of every batch norm in the task's modules: a forward pass
    updates them before its loss is judged, so a skipped step must put them back."""
    modules = [task.model, *(obj for obj in task.stateful.values() if isinstance(obj, nn.Module))]
    return [buffer for module in modules for layer in module.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) for buffer in layer.buffers()]


def _agree(loss: torch.Tensor, grads: list[torch.Tensor], stopping: bool, rt: Runtime) -> tuple[bool, bool]:
    """(loss or a gradient non-finite, stop requested), each OR-ed over all ranks so that every rank
    takes the same branch. Built on the loss's device and read once: the step's only wait for the GPU."""
    loss = loss.detach().reshape(())
    nonfinite = ~torch.isfinite(loss)
    if grads:  # the largest |gradient| is finite only if every gradient is
        nonfinite |= ~torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf")).to(loss.device))
    flags = torch.stack([nonfinite.float(), loss.new_full((), float(stopping))])
    if rt.world_size > 1:
        torch.distributed.all_reduce(flags)
    nonfinite, stop = flags.tolist()
    return nonfinite > 0, stop > 0


def _rank_randomness(task: TrainTask) -> dict[str, Any]:
    """This rank's own random state: the global generators and the stage's generators, which
    are seeded per rank (``seed + rank``), so each rank resumes its own augmentation draws."""
    return {"rng": capture_rng(),
            "generators": {name: obj.state_dict() for name, obj in task.stateful.items() if isinstance(obj, GeneratorState)}}


def _checkpoint_state(task: TrainTask, step: int, epoch: int, batch_in_epoch: int, metrics: dict[str, Any],
                      skipped: int, scaler: Optional[torch.amp.GradScaler], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    state = {name: obj.state_dict() for name, obj in task.stateful.items()}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    return {
        **task.checkpoint_meta,
        "stage": task.stage,
        "model": unwrap(task.model).state_dict(),
        "optimizer": task.optimizer.state_dict(),
        "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "images_per_step": task.images_per_step, "steps_per_epoch": len(task.batches), "skipped_steps": skipped,
        "rank_randomness": ranks, "state": state,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }


def _other_setup(path: Path, what: str, detail: str) -> CheckpointError:
    """The refusal: saved states fit only the model and optimiser that wrote them."""
    return CheckpointError(f"{path} was written with a different {what} ({detail}); resume with the flags it was "
                           "written with, or use another --run-dir")


def _optimizer_flag(meta: dict[str, Any]) -> Optional[str]:
    """``--optimizer`` as the stage recorded it in its config (None for tasks without a config)."""
    return ((meta.get("config") or {}).get("optim") or {}).get("optimizer")


def _check_same_setup(path: Path, ckpt: dict[str, Any], task: TrainTask) -> None:
    """Refuse a resume whose model or optimiser differs from the checkpoint's: PyTorch reports the
    mismatch as a 100-line traceback, or, between optimisers with alike parameter groups, not at all."""
    record, meta = read_model_record(ckpt), task.checkpoint_meta
    saved = {**asdict(record[0]), "mode": record[1]} if record else {}
    now = {**meta["model_spec"], "mode": meta.get("mode")} if "model_spec" in meta else {}
    changed = [f"{key} {value}, this run {now[key]}" for key, value in saved.items()
               if key in now and now[key] != value]
    if changed:
        raise _other_setup(path, "model", ", ".join(changed))
    saved, now = _optimizer_flag(ckpt), _optimizer_flag(task.checkpoint_meta)
    if saved and now and saved != now:
        raise _other_setup(path, "optimiser", f"--optimizer {saved}, this run {now}")


def _load_state(path: Path, what: str, obj: Stateful, state: dict[str, Any]) -> None:
    """``obj.load_state_dict(state)``, a mismatch reported in one line (settings that no recorded
    option names, e.g. the trainable layers or the queue size)."""
    try:
        obj.load_state_dict(state)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError):
        raise _other_setup(path, what, "its saved state does not fit this run's") from None


def _resume(task: TrainTask, run_dir: Path, rt: Runtime,
            scaler: Optional[torch.amp.GradScaler]) -> tuple[int, int, int, dict[str, Any], int]:
    """Restore the newest checkpoint: (step, epoch, batch in epoch, last metrics, skipped steps)."""
    # Loaded onto the CPU: RNG states must stay CPU tensors, and loading copies the model and
    # optimiser states onto their parameters' device.
    found = latest_checkpoint_of_all_ranks(run_dir, map_location="cpu")
    if found is None:
        return 0, 0, 0, {}, 0
    path, ckpt = found
    if ckpt.get("stage") != task.stage:
        raise CheckpointError(f"{path} is a {ckpt.get('stage')} checkpoint but this is a {task.stage} run; "
                              "use another --run-dir")
    saved_batch = ckpt.get("images_per_step", task.images_per_step)
    saved_steps = ckpt.get("steps_per_epoch", len(task.batches))
    if saved_batch != task.images_per_step:
        raise CheckpointError(f"{path} was written with a global batch of {saved_batch} but this run has "
                              f"{task.images_per_step}; resume with the same --train-batch-size and number of "
                              "processes, or use another --run-dir")
    if saved_steps != len(task.batches):
        raise CheckpointError(f"{path} was written with {saved_steps} steps per epoch but this run has "
                              f"{len(task.batches)}: the training data differ; resume with the same data "
                              "(--dataset, --data-dir, --subset, label options), or use another --run-dir")
    missing = sorted(set(task.stateful) - set(ckpt["state"]))
    if missing:
        raise CheckpointError(f"{path} holds no {', '.join(missing)} state (written with other settings, e.g. "
                              "--use-memory); resume with the settings it was written with, or use another --run-dir")
    _check_same_setup(path, ckpt, task)
    _load_state(path, "model", unwrap(task.model), ckpt["model"])
    _load_state(path, "optimiser", task.optimizer, ckpt["optimizer"])
    ranks = ckpt.get("rank_randomness") or [{"rng": ckpt["rng"], "generators": {}}]  # format 1: rank 0's only
    own = ranks[rt.rank] if len(ranks) == rt.world_size else ranks[0]
    if len(ranks) != rt.world_size and rt.is_main:
        print(f"note: {path} holds the random state of {len(ranks)} process(es), this run has {rt.world_size}; every rank "
              "resumes rank 0's random state, so augmentations differ from an uninterrupted run")
    for name, obj in task.stateful.items():
        _load_state(path, name, obj, own["generators"].get(name, ckpt["state"][name]))
    if scaler is not None and "grad_scaler" in ckpt["state"]:
        scaler.load_state_dict(ckpt["state"]["grad_scaler"])
    restore_rng(own["rng"])
    if rt.is_main:
        print(f"resuming {task.stage} from {path} (step {ckpt['step']})")
    return ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["metrics"], ckpt.get("skipped_steps", 0)


def _kept_checkpoint(run_dir: Path) -> str:
    """What a stopped run leaves to resume from: a checkpoint is promised only where one exists."""
    kept = step_checkpoints(run_dir / CHECKPOINT_DIR)
    if not kept:
        return "no checkpoint was written yet, so a rerun starts from step 0"
    return f"the last good checkpoint, {kept[-1].name}, is kept in {kept[-1].parent}"


def _nonfinite_step(loss: torch.Tensor, step: int, skipped: int, cfg: RuntimeConfig, run_dir: Path) -> None:
    """Stop on a non-finite step, unless ``--on-nonfinite skip`` and the limit is not passed yet."""
    value = float(loss.detach().float().reshape(()))
    what = (f"non-finite loss ({value}) at step {step}" if not math.isfinite(value)
            else f"non-finite gradients at step {step} (the loss, {value:.4g}, is finite)")
    if cfg.on_nonfinite != "skip":
        raise NonFiniteLoss(f"{what}; {_kept_checkpoint(run_dir)}. Lower --learning-rate, or use --on-nonfinite skip "
                            "to skip such steps")
    if skipped > cfg.max_skipped_steps:
        raise NonFiniteLoss(f"{what}: {skipped} steps skipped, more than --max-skipped-steps "
                            f"{cfg.max_skipped_steps}; {_kept_checkpoint(run_dir)}. Lower --learning-rate")


def _write_marker(run_dir: Path, signum: int, step: int) -> None:
    """Tell a job script that this run stopped on a signal after saving and wants to be resumed
    (under torchrun the exit code does not: torchrun reports any failed worker as 1)."""
    record = {"signal": signal.Signals(signum).name, "step": step, "resume": "rerun the same command"}
    write_text(run_dir / INTERRUPTED_MARKER, json.dumps(record) + "\n")


def _skipped_images(batches: BatchSource) -> dict[str, int]:
    """Unreadable images replaced so far (``--skip-bad-images``), for sources that count them."""
    count = getattr(batches, "skipped", None)
    return {} if count is None else {"skipped_images": count}


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)


def train(task: TrainTask, rt: Runtime, cfg: RuntimeConfig, run_dir: Path) -> dict[str, Any]:
    """Run ``task`` to ``task.total_steps`` (or ``cfg.max_steps``) and return the last metrics."""
    run_dir = Path(run_dir)
    if rt.is_main:  # what an earlier, killed or stopped, run of this folder left
        (run_dir / INTERRUPTED_MARKER).unlink(missing_ok=True)
        remove_stale_temp_files(run_dir / CHECKPOINT_DIR)
    scaler = rt.grad_scaler()
    step, epoch, batch_in_epoch, last, skipped = _resume(task, run_dir, rt, scaler) if cfg.resume else (0, 0, 0, {}, 0)
    if rt.is_main and "config" in task.checkpoint_meta:  # after the resume checks: a refused run changes nothing
        save_config(task.checkpoint_meta["config"], run_dir)
    logger = MetricsLogger(run_dir, enabled=rt.is_main, start_step=step)
    stop_at = min(task.total_steps, cfg.max_steps) if cfg.max_steps else task.total_steps
    steps_per_epoch = len(task.batches)
    bar = _progress(stop_at, step, cfg.progress and rt.is_main, task.stage)
    window_start, window_images = time.perf_counter(), 0

    def save() -> None:
        """Rank 0 writes; every rank learns whether it could, and all stop together if not."""
        ranks = distributed.all_gather_object(_rank_randomness(task))  # every rank reaches each save together

        def write() -> None:
            state = _checkpoint_state(task, step, epoch, batch_in_epoch, last, skipped, scaler, ranks)
            try:
                save_checkpoint(run_dir, state, step, cfg.keep_checkpoint_max)
            except NonFiniteState as err:
                raise NonFiniteLoss(f"{err}, so it is not saved; {_kept_checkpoint(run_dir)}. Lower "
                                    "--learning-rate") from None
            except OSError as err:
                raise SaveFailed(f"cannot write the step {step} checkpoint in {run_dir / CHECKPOINT_DIR} "
                                 f"({err.strerror or err}); free disk space (or lower --keep-checkpoint-max) "
                                 f"or fix the folder's permissions, then rerun the same command to resume: "
                                 f"{_kept_checkpoint(run_dir)}") from None
        distributed.decided_by_main(write)

    statistics = _batch_norm_statistics(task) if cfg.on_nonfinite == "skip" else []
    task.model.train()
    try:
        with _StopFlag() as stop:
            while step < stop_at:
                task.batches.set_epoch(epoch, batch_in_epoch)
                for batch in task.batches:
                    lr = task.lr_fn(step)
                    for group in task.optimizer.param_groups:
                        group["lr"] = lr
                    kept = [buffer.clone() for buffer in statistics]
                    with rt.autocast():
                        loss, metrics = task.step_fn(batch, step)
                    task.optimizer.zero_grad(set_to_none=True)
                    (loss if scaler is None else scaler.scale(loss)).backward()
                    # The scaler judges the (scaled) gradients itself: fp16 overflows are routine there.
                    grads = _grads(task.optimizer) if scaler is None else []
                    nonfinite, stopping = _agree(loss, grads, stop.signal is not None, rt)
                    if nonfinite:
                        skipped += 1
                        _nonfinite_step(loss, step, skipped, cfg, run_dir)
                        for buffer, before in zip(statistics, kept):
                            buffer.copy_(before)
                    else:
                        if scaler is not None:
                            scaler.step(task.optimizer)
                            scaler.update()
                        else:
                            task.optimizer.step()
                        if task.after_step is not None:
                            task.after_step(step)
                    step += 1
                    batch_in_epoch += 1
                    window_images += task.images_per_step
                    if bar is not None:
                        bar.update(1)
                    if step % cfg.log_every_steps == 0 or step == stop_at:
                        elapsed = time.perf_counter() - window_start
                        last = logger.log("step", step, {
                            "epoch": epoch, "loss": loss.detach().float(), "learning_rate": lr,
                            "images_per_s": window_images / max(elapsed, 1e-9), "skipped_steps": skipped,
                            **_skipped_images(task.batches),
                            **{k: v.detach().float() if torch.is_tensor(v) else v for k, v in metrics.items()}})
                        window_start, window_images = time.perf_counter(), 0
                        if bar is not None:
                            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
                    if stopping:
                        save()
                        if rt.is_main:
                            _write_marker(run_dir, stop.signal or signal.SIGTERM, step)
                        raise Interrupted(f"stopped by signal {stop.signal} at step {step}; checkpoint saved in "
                                          f"{run_dir / 'checkpoints'}; rerun the same command to resume")
                    if step % cfg.checkpoint_steps == 0 and batch_in_epoch < steps_per_epoch:
                        save()
                    if step >= stop_at:
                        break
                if batch_in_epoch >= steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                    if task.end_of_epoch is not None:
                        epoch_metrics = task.end_of_epoch(epoch)
                        last = {**last, **logger.log("epoch", step, {"epoch": epoch, **epoch_metrics})}
                        task.model.train()
                    save()
            if batch_in_epoch:
                save()
        distributed.barrier()  # later readers (the next stage, other ranks) see the final checkpoint
    except RuntimeError as err:
        if not worker_died(err):
            raise
        raise WorkerDied(f"a DataLoader worker died ({str(err).split('. ')[0]}); lower --num-workers or check the "
                         f"memory (the OOM killer stops workers), then rerun the same command to resume: "
                         f"{_kept_checkpoint(run_dir)}") from None
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    return {**last, "step": step, "epoch": epoch, "skipped_steps": skipped}
