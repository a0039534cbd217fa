"""The paper's findings, measured at small scale on the embedded Fashion-MNIST data (issue #19).

Five findings of SimCLRv2 (Chen et al., 2020), each a set of variants run with several seeds at
the embedded preset's label amounts (10 labels per class and 1 %):

1. where to fine-tune from: encoder output, head layer 1 or head layer 2 of a 3-layer head (Fig. 5);
2. projection-head depth 2, 3 or 4, each at its best fine-tune layer chosen on validation (Fig. 5);
3. bigger encoders (width, depth, SK) gain more over a same-size supervised baseline (Fig. 1, Table 1);
4. distillation into a half-width student vs that student on labels alone or after its own
   pretraining (Table 3, Fig. 6);
5. pretraining with the momentum encoder and queue vs without (appendix D).

Every training run is one ``python -m simclrv2 <command>`` in its own folder under ``--out``,
named after what it computes, so runs shared by findings (the preset model's pretraining serves
findings 1, 2, 3, 4 and 5) run once, and a rerun after an interruption skips what finished and
resumes what did not with the same command (each command resumes from its newest checkpoint and
refuses changed settings). Hyper-parameters are the embedded preset's, read from
``simclrv2.config.build`` at run time, so the study follows the preset as it is re-tuned.

Validation protocol: a class-balanced part of the training split (``--val-per-class`` images a
class, the same for every seed) is held out from the labels; every fine-tune trains on a label
file of other training images, drawn per seed. Choices (finding 2's layer) are made on the
held-out part, evaluated here with ``simclrv2.load`` because ``simclrv2 evaluate`` can only read
a whole split; results are reported on the test split, which the commands evaluate themselves.
Pretraining and distillation see every training image without its label, as in the paper.

    python experiments/paper_findings.py --out runs/paper-findings            # everything, 3 seeds
    python experiments/paper_findings.py --findings 1,3 --seeds 0 --out runs/f13
    python experiments/paper_findings.py --quick --out /tmp/paper-quick        # a miniature, minutes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
SK_RATIO = 0.0625  # paper section 2 / official resnet.py: the SK ratio of every SK model
DEEPER = {18: 34, 34: 50, 50: 101, 101: 152, 152: 200}
VALIDATION_SEED = 1_000_003  # the held-out part is the same for every study seed
QUICK_STEPS = 2  # --quick: steps of every training run
QUICK_IMAGES = {"train": 60, "test": 20}  # --quick: images a class of its miniature Fashion-MNIST
QUICK_BATCH = 32  # --quick: batch of pretraining and distillation


# ----------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Model:
    """An encoder and its projection head, as the CLI's model flags set them."""

    depth: int
    width: float
    sk: float = 0.0
    head: int = 3
    memory: bool = False  # pretrained with the momentum encoder and queue

    def key(self) -> str:
        return f"r{self.depth}-w{self.width:g}" + ("-sk" if self.sk else "") + f"-head{self.head}" + \
            ("-memory" if self.memory else "")

    def label(self) -> str:
        return f"R{self.depth} x{self.width:g}" + (" +SK" if self.sk else "")

    def flags(self) -> list[str]:
        return ["--resnet-depth", str(self.depth), "--width-multiplier", str(self.width),
                "--sk-ratio", str(self.sk), "--num-proj-layers", str(self.head)]


def amount_name(amount: tuple[str, float]) -> str:
    """``("per_class", 10)`` -> ``10-per-class``; ``("fraction", 0.01)`` -> ``1%``."""
    kind, value = amount
    return f"{value:g}-per-class" if kind == "per_class" else f"{100 * value:g}%"


def run_folder(command: str, *parts: Any, seed: int) -> str:
    """The folder of one run under ``--out``: the command, then what distinguishes the run."""
    return "/".join([command, *map(str, parts), f"seed{seed}"])


def per_class_counts(labels: list[int], amount: tuple[str, float]) -> dict[int, int]:
    """Labelled images a class: a fixed count, or the fraction of the class's training images
    rounded half up, at least 1 (as ``--label-fraction`` counts them)."""
    kind, value = amount
    sizes: dict[int, int] = {}
    for y in labels:
        sizes[y] = sizes.get(y, 0) + 1
    if kind == "per_class":
        return {c: int(value) for c in sizes}
    return {c: max(1, math.floor(value * n + 0.5)) for c, n in sizes.items()}


def draw_per_class(labels: list[int], counts: dict[int, int], seed: int,
                   exclude: frozenset = frozenset()) -> list[int]:
    """Sorted indices of ``counts[c]`` images of each class c, drawn by a seeded shuffle from the
    images not in ``exclude``; raises ValueError when a class has too few."""
    import random

    rng = random.Random(seed)
    chosen: list[int] = []
    for c in sorted(counts):
        members = [i for i, y in enumerate(labels) if y == c and i not in exclude]
        if counts[c] > len(members):
            raise ValueError(f"class {c} has {len(members)} images left, fewer than the {counts[c]} needed; "
                             "lower --val-per-class")
        rng.shuffle(members)
        chosen += members[:counts[c]]
    return sorted(chosen)


def flat(flags: dict[str, str]) -> list[str]:
    return [part for pair in flags.items() for part in pair]


def summarize(per_seed: dict[int, float]) -> dict[str, Any]:
    """Every seed's value with their mean and sample standard deviation (none for one seed)."""
    values = [per_seed[s] for s in sorted(per_seed)]
    return {"per_seed": {str(s): per_seed[s] for s in sorted(per_seed)}, "n": len(values),
            "mean": round(statistics.fmean(values), 3),
            "sd": round(statistics.stdev(values), 3) if len(values) > 1 else None}


def choose_by_validation(validation: dict[Any, dict[int, float]]) -> Any:
    """The option with the highest mean validation accuracy over seeds (the first on a tie)."""
    return max(validation, key=lambda option: statistics.fmean(validation[option].values()))


def cell(summary: dict[str, Any]) -> str:
    """``mean ± sd`` for a markdown table."""
    sd = summary["sd"]
    return f"{summary['mean']:.2f}" + ("" if sd is None else f" ± {sd:.2f}")


# ----------------------------------------------------------------------------- runs


@dataclass
class Task:
    """One CLI run in ``folder`` (after the runs in ``needs``); ``validate`` also scores it on the
    held-out part of the training split."""

    command: str
    folder: str
    seed: int
    flags: list[str]
    needs: list[str] = field(default_factory=list)
    validate: bool = False


class Study:
    """Registers the runs the findings need (each folder once) and reads their results."""

    def __init__(self, out: Path, seeds: list[int], amounts: list[tuple[str, float]], quick: bool,
                 val_per_class: int):
        from simclrv2 import config

        self.out, self.seeds, self.amounts, self.quick = out, seeds, amounts, quick
        self.data_dir = out / "quick-data" if quick else None
        self.data = ["--dataset", "fashion_mnist", "--data-dir", str(self.data_dir)] if quick else []
        self.val_per_class = val_per_class
        preset = config.build("pipeline")
        m = preset.pretrain.model
        self.base = Model(m.resnet_depth, m.width_multiplier, m.sk_ratio, m.num_proj_layers)
        self.selector = config.build("finetune").model.ft_proj_selector
        self.baseline_optim = config.to_dict(preset.baseline.optim)
        self.tasks: dict[str, Task] = {}

    # flags -------------------------------------------------------------------------------
    def _quick(self, command: str) -> dict[str, str]:
        """--quick's flags: a few steps, unlabeled images in small batches."""
        if not self.quick:
            return {}
        unlabeled = command in ("pretrain", "distill")
        return {"--train-steps": str(QUICK_STEPS), **({"--train-batch-size": str(QUICK_BATCH)} if unlabeled else {})}

    def label_file(self, amount: tuple[str, float], seed: int) -> str:
        return str(self.out / "labels" / f"{amount_name(amount)}-seed{seed}.txt")

    def _add(self, task: Task) -> str:
        old = self.tasks.get(task.folder)
        self.tasks[task.folder] = replace(task, validate=task.validate or bool(old and old.validate))
        return task.folder

    # runs --------------------------------------------------------------------------------
    def pretrain(self, model: Model, seed: int) -> str:
        flags = model.flags() + (["--use-memory"] if model.memory else []) + flat(self._quick("pretrain"))
        return self._add(Task("pretrain", run_folder("pretrain", model.key(), seed=seed), seed, self.data + flags))

    def finetune(self, model: Model, selector: int, amount, seed: int, validate: bool = False) -> str:
        pre = self.pretrain(model, seed)
        flags = ["--checkpoint", str(self.out / pre), "--ft-proj-selector", str(selector),
                 "--label-file", self.label_file(amount, seed)] + flat(self._quick("finetune"))
        folder = run_folder("finetune", model.key(), f"layer{selector}", amount_name(amount), seed=seed)
        return self._add(Task("finetune", folder, seed, self.data + flags, [pre], validate))

    def baseline(self, model: Model, amount, seed: int) -> str:
        """The same encoder trained from scratch on the labels alone, with the preset's baseline
        settings (the ``pipeline``'s supervised baseline)."""
        optim = {f"--{name.replace('_', '-')}": str(value) for name, value in self.baseline_optim.items()}
        flags = model.flags() + ["--ft-proj-selector", str(self.selector), "--label-file",
                                 self.label_file(amount, seed)] + flat({**optim, **self._quick("finetune")})
        folder = run_folder("baseline", model.key(), amount_name(amount), seed=seed)
        return self._add(Task("finetune", folder, seed, self.data + flags))

    def distill(self, teacher: Model, student: Model, amount, seed: int) -> str:
        """The fine-tuned teacher distilled into ``student``, which starts from random weights
        (paper section 2; as the pipeline does for a smaller student)."""
        ft = self.finetune(teacher, self.selector, amount, seed)
        flags = ["--checkpoint", str(self.out / ft), "--student.resnet-depth", str(student.depth),
                 "--student.width-multiplier", str(student.width), "--student.sk-ratio", str(student.sk),
                 "--student.num-proj-layers", str(student.head), "--student.ft-proj-selector", str(self.selector),
                 "--label-file", self.label_file(amount, seed)] + flat(self._quick("distill"))
        folder = run_folder("distill", f"{teacher.key()}-to-{student.key()}", amount_name(amount), seed=seed)
        return self._add(Task("distill", folder, seed, self.data + flags, [ft]))

    # results -----------------------------------------------------------------------------
    def test_top1(self, folder: str) -> float:
        return json.loads((self.out / folder / "eval.json").read_text())["top1"]

    def val_top1(self, folder: str) -> float:
        return json.loads((self.out / "validation" / f"{folder}.json").read_text())["top1"]

    def per_seed(self, make: Callable[[int], str], read: Optional[Callable[[str], float]] = None) -> dict[int, float]:
        read = read or self.test_top1
        return {seed: read(make(seed)) for seed in self.seeds}


# ----------------------------------------------------------------------------- findings
# Each finding registers its runs and returns a function that reads them once they have run:
# {amount: {variant: summary}} to tabulate and plot, and details beside them.


def finding_1(study: Study) -> Callable[[], dict[str, Any]]:
    model = replace(study.base, head=3)
    for amount in study.amounts:
        for seed in study.seeds:
            for layer in range(3):
                study.finetune(model, layer, amount, seed, validate=True)

    def collect() -> dict[str, Any]:
        return {"amounts": {amount_name(a): {
            f"layer {layer}" + (" (encoder output)" if layer == 0 else ""):
                summarize(study.per_seed(lambda s: study.finetune(model, layer, a, s)))
            for layer in range(3)} for a in study.amounts}}
    return collect


def finding_2(study: Study) -> Callable[[], dict[str, Any]]:
    heads = (2, 3, 4)
    for amount in study.amounts:
        for seed in study.seeds:
            for head in heads:
                for layer in range(head):
                    study.finetune(replace(study.base, head=head), layer, amount, seed, validate=True)

    def collect() -> dict[str, Any]:
        amounts, details = {}, {}
        for a in study.amounts:
            amounts[amount_name(a)], details[amount_name(a)] = {}, {}
            for head in heads:
                model = replace(study.base, head=head)
                validation = {layer: study.per_seed(lambda s: study.finetune(model, layer, a, s), study.val_top1)
                              for layer in range(head)}
                best = choose_by_validation(validation)
                amounts[amount_name(a)][f"{head} layers (layer {best})"] = summarize(
                    study.per_seed(lambda s: study.finetune(model, best, a, s)))
                details[amount_name(a)][f"{head} layers"] = {
                    "chosen_layer": best,
                    "validation_top1": {f"layer {layer}": summarize(v) for layer, v in validation.items()},
                    "test_top1": {f"layer {layer}": summarize(study.per_seed(lambda s: study.finetune(model, layer, a, s)))
                                  for layer in range(head)}}
        return {"amounts": amounts, "details": details}
    return collect


def encoder_sizes(base: Model) -> list[Model]:
    """The preset encoder, twice as wide and one step deeper, each without and with SK."""
    sizes = [base, replace(base, width=2 * base.width), replace(base, depth=DEEPER[base.depth])]
    return [replace(m, sk=sk) for m in sizes for sk in (0.0, SK_RATIO)]


def finding_3(study: Study) -> Callable[[], dict[str, Any]]:
    models = encoder_sizes(study.base)
    for amount in study.amounts:
        for seed in study.seeds:
            for model in models:
                study.finetune(model, study.selector, amount, seed)
                study.baseline(model, amount, seed)

    def collect() -> dict[str, Any]:
        amounts, details = {}, {}
        for a in study.amounts:
            amounts[amount_name(a)], details[amount_name(a)] = {}, {}
            for model in models:
                tuned = study.per_seed(lambda s: study.finetune(model, study.selector, a, s))
                alone = study.per_seed(lambda s: study.baseline(model, a, s))
                amounts[amount_name(a)][model.label()] = summarize(
                    {s: round(tuned[s] - alone[s], 3) for s in study.seeds})
                details[amount_name(a)][model.label()] = {"fine-tuned": summarize(tuned), "supervised": summarize(alone)}
        return {"amounts": amounts, "details": details}
    return collect


def finding_4(study: Study) -> Callable[[], dict[str, Any]]:
    student = study.base
    teacher = replace(student, width=2 * student.width)
    variants = {
        f"distilled from {teacher.label()}": lambda a, s: study.distill(teacher, student, a, s),
        "labels alone": lambda a, s: study.baseline(student, a, s),
        "own pretraining + fine-tune": lambda a, s: study.finetune(student, study.selector, a, s),
        f"teacher {teacher.label()} (reference)": lambda a, s: study.finetune(teacher, study.selector, a, s),
    }
    for amount in study.amounts:
        for seed in study.seeds:
            for make in variants.values():
                make(amount, seed)

    def collect() -> dict[str, Any]:
        return {"student": student.label(), "teacher": teacher.label(), "amounts": {amount_name(a): {
            name: summarize(study.per_seed(lambda s: make(a, s))) for name, make in variants.items()}
            for a in study.amounts}}
    return collect


def finding_5(study: Study) -> Callable[[], dict[str, Any]]:
    models = {"without memory": study.base, "with memory": replace(study.base, memory=True)}
    for amount in study.amounts:
        for seed in study.seeds:
            for model in models.values():
                study.finetune(model, study.selector, amount, seed)

    def collect() -> dict[str, Any]:
        return {"amounts": {amount_name(a): {
            name: summarize(study.per_seed(lambda s: study.finetune(model, study.selector, a, s)))
            for name, model in models.items()} for a in study.amounts}}
    return collect


FINDINGS: dict[int, tuple[str, str, str, Callable[[Study], Callable[[], dict[str, Any]]]]] = {
    1: ("Where to fine-tune from", "Fig. 5", "test top-1 (%)", finding_1),
    2: ("Projection head depth, each at its best layer on validation", "Fig. 5", "test top-1 (%)", finding_2),
    3: ("Bigger models gain more over a same-size supervised baseline", "Fig. 1, Table 1",
        "gain in test top-1 (points): fine-tuned minus supervised", finding_3),
    4: ("Distillation into a half-width student", "Table 3, Fig. 6", "student test top-1 (%)", finding_4),
    5: ("The memory (momentum encoder and queue)", "appendix D", "test top-1 (%)", finding_5),
}


# ----------------------------------------------------------------------------- data


def claim_study(out: Path, settings: dict[str, Any]) -> None:
    """Record the settings that shape every label file in ``out/study.json``; refuse a rerun with
    others (the commands compare the label file's path, not its contents)."""
    path = out / "study.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        if changed:
            raise SystemExit(f"paper_findings: error: {out} was run with {', '.join(f'{k}={saved.get(k)}' for k in changed)}; "
                             "rerun with the same settings or choose another --out")
        return
    write_atomic(path, json.dumps(settings) + "\n")


def write_label_files(study: Study) -> None:
    """The held-out validation ids and, per label amount and seed, the training ids with labels."""
    train = training_split(study.data_dir)
    labels = train.labels.tolist()
    ids = train.sample_ids
    val = draw_per_class(labels, {c: study.val_per_class for c in set(labels)}, VALIDATION_SEED)
    write_lines(study.out / "labels" / "validation.txt", [ids[i] for i in val])
    held_out = frozenset(val)
    for amount in study.amounts:
        for seed in study.seeds:
            chosen = draw_per_class(labels, per_class_counts(labels, amount), seed, held_out)
            write_lines(Path(study.label_file(amount, seed)), [ids[i] for i in chosen])


def training_split(data_dir: Optional[Path]):
    """The embedded training split, or --quick's miniature of it."""
    from simclrv2.data import build_dataset

    return build_dataset("embedded" if data_dir is None else "fashion_mnist", data_dir, "train")


def write_quick_data(folder: Path) -> None:
    """A miniature Fashion-MNIST (``QUICK_IMAGES`` a class, drawn from the embedded data) as the
    official IDX files, so that --quick's runs, including their evaluation, take seconds."""
    from simclrv2.data import build_dataset

    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = build_dataset("embedded", None, split)
        labels = data.labels.tolist()
        chosen = draw_per_class(labels, {c: QUICK_IMAGES[split] for c in set(labels)}, VALIDATION_SEED)
        images = data.images[chosen, 0]  # grey: the three channels are one
        write_idx(folder / f"{prefix}-images-idx3-ubyte", 0x803, list(images.shape), images.numpy().tobytes())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", 0x801, [len(chosen)], bytes(labels[i] for i in chosen))


def write_idx(path: Path, magic: int, dims: list[int], data: bytes) -> None:
    """An unsigned-byte IDX file: big-endian magic and dimensions, then the bytes."""
    header = b"".join(n.to_bytes(4, "big") for n in [magic, *dims])
    if path.exists() and path.read_bytes() == header + data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(header + data)
    os.replace(tmp, path)


def write_lines(path: Path, lines: list[str]) -> None:
    """Write ``path`` atomically, leaving an equal file alone (so a resumed run sees no change)."""
    text = "".join(f"{line}\n" for line in lines)
    if path.exists() and path.read_text() == text:
        return
    write_atomic(path, text)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def validation_top1(run_dir: Path, images, labels) -> float:
    """Top-1 (%) of the model in ``run_dir`` on held-out training images, preprocessed as the
    commands evaluate (``simclrv2.data.EvalTransform``)."""
    import torch

    import simclrv2
    from simclrv2.data import EvalTransform

    model = simclrv2.load(run_dir)
    transform = EvalTransform(model.image_size or images.shape[-1])
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 500):
            predicted = model.predict(transform(images[start:start + 500])).argmax(1)
            correct += int((predicted == labels[start:start + 500]).sum())
    return round(100.0 * correct / len(images), 2)


# ----------------------------------------------------------------------------- execution


def levels(tasks: dict[str, Task]) -> list[list[Task]]:
    """Tasks grouped so that each group needs only earlier groups (runs within one may go in parallel)."""
    depth: dict[str, int] = {}

    def level(folder: str) -> int:
        if folder not in depth:
            depth[folder] = 1 + max((level(n) for n in tasks[folder].needs), default=-1)
        return depth[folder]

    groups: dict[int, list[Task]] = {}
    for folder in sorted(tasks):
        groups.setdefault(level(folder), []).append(tasks[folder])
    return [groups[k] for k in sorted(groups)]


class Runner:
    """Runs tasks as subprocesses, ``jobs`` at a time, skipping finished ones."""

    def __init__(self, out: Path, jobs: int, data_dir: Optional[Path]):
        self.out, self.jobs, self.data_dir = out, jobs, data_dir
        self.threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        self._validation: Optional[tuple[Any, Any]] = None
        self._lock = threading.Lock()

    def argv(self, task: Task) -> list[str]:
        runtime = ["--run-dir", str(self.out / task.folder), "--seed", str(task.seed),
                   "--progress", "false"] + ([] if self.threads is None else ["--num-threads", str(self.threads)])
        return [sys.executable, "-m", "simclrv2", task.command, *task.flags, *runtime]

    def record(self, task: Task) -> Path:
        return self.out / "done" / f"{task.folder}.json"

    def run_all(self, tasks: dict[str, Task]) -> None:
        for group in levels(tasks):
            todo = [t for t in group if not self.record(t).exists()]
            print(f"[paper_findings] {len(group) - len(todo)} of {len(group)} runs already done; running {len(todo)}",
                  flush=True)
            with ThreadPoolExecutor(self.jobs) as pool:
                failures = [f for f in pool.map(self.run_one, todo) if f]
            if failures:
                raise SystemExit("paper_findings: error: " + "; ".join(failures))

    def run_one(self, task: Task) -> Optional[str]:
        """Run one task (and its validation); returns an error message or None."""
        argv = self.argv(task)
        log = self.out / "logs" / f"{task.folder}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"[paper_findings] {task.folder}", flush=True)
        with open(log, "a") as handle:
            handle.write(f"$ {shlex.join(argv)}\n")
            handle.flush()
            code = subprocess.call(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        if code != 0:
            return f"{task.folder} exited with {code}; see {log} (rerun to resume)"
        if task.validate:
            images, labels = self.validation_set()
            write_atomic(self.out / "validation" / f"{task.folder}.json",
                         json.dumps({"top1": validation_top1(self.out / task.folder, images, labels),
                                     "num_examples": len(labels)}) + "\n")
        write_atomic(self.record(task), json.dumps({"command": "python " + shlex.join(argv[1:]),
                                                    "seconds": round(time.perf_counter() - start, 1)}) + "\n")
        return None

    def validation_set(self):
        with self._lock:
            if self._validation is None:
                train = training_split(self.data_dir)
                ids = (self.out / "labels" / "validation.txt").read_text().split()
                index = {sample_id: i for i, sample_id in enumerate(train.sample_ids)}
                subset = train.subset([index[i] for i in ids])
                self._validation = (subset.images, subset.labels)
            return self._validation


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    def output(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in output("lscpu").splitlines()
                if line.startswith("Model name")), platform.processor())
    import torch

    return {"commit": output("git", "rev-parse", "HEAD"), "uncommitted_changes": bool(output("git", "status", "--porcelain")),
            "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Paper findings at small scale{' (--quick: a miniature, not a measurement)' if results['quick'] else ''}",
             "", f"Commit {results['machine']['commit']}, {results['machine']['cpu']} "
             f"({results['machine']['cpu_count']} CPUs), seeds {results['seeds']}, "
             f"wall time {results['wall_time_s']:.0f} s. Mean ± sd over seeds.", ""]
    for key, finding in results["findings"].items():
        amounts = list(finding["amounts"])
        lines += [f"## Finding {key}: {finding['title']} (paper {finding['paper']})", "",
                  f"{finding['measure']}", "", "| variant | " + " | ".join(amounts) + " |",
                  "|---|" + "---:|" * len(amounts)]
        for variant in finding["amounts"][amounts[0]]:
            lines.append(f"| {variant} | " + " | ".join(cell(finding["amounts"][a][variant]) for a in amounts) + " |")
        lines += ["", f"![finding {key}](finding-{key}.png)", ""]
    return "\n".join(lines)


def plot(finding: dict[str, Any], path: Path) -> None:
    """Bars of the mean per variant, one colour per label amount, with sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    amounts = list(finding["amounts"])
    variants = list(finding["amounts"][amounts[0]])
    width = 0.8 / len(amounts)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(variants)), 3.6))
    for k, amount in enumerate(amounts):
        summaries = [finding["amounts"][amount][v] for v in variants]
        ax.bar([i + k * width for i in range(len(variants))], [s["mean"] for s in summaries], width,
               yerr=[s["sd"] or 0.0 for s in summaries], capsize=3, label=amount)
    ax.set_xticks([i + width * (len(amounts) - 1) / 2 for i in range(len(variants))])
    ax.set_xticklabels(variants, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(finding["measure"], fontsize=8)
    ax.set_title(f"{finding['title']} (paper {finding['paper']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_list(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="Study folder: runs, labels, logs and results.")
    parser.add_argument("--findings", default="1,2,3,4,5", help="Findings to run, e.g. 1,3. (default: all)")
    parser.add_argument("--seeds", default=None, help="Seeds, e.g. 0,1,2. (default: 0,1,2; --quick: 0)")
    parser.add_argument("--amounts", default=None, help="Label amounts: 10-per-class and/or 1%%, comma-separated. "
                        "(default: the embedded preset's; --quick: the first)")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="Training images a class held out for validation. (default: 500; --quick: 20)")
    parser.add_argument("--jobs", type=int, default=1, help="Runs at a time, sharing the CPUs. (default: 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"A miniature of every finding: {QUICK_STEPS} steps a run on a Fashion-MNIST of "
                             f"{QUICK_IMAGES['train']} training images a class, one seed, one label amount; checks "
                             "that the study runs, measures nothing.")
    args = parser.parse_args(argv)
    args.findings = parse_list(args.findings, int)
    unknown = sorted(set(args.findings) - set(FINDINGS))
    if unknown:
        parser.error(f"--findings: no finding {unknown[0]}; choose from {sorted(FINDINGS)}")
    args.seeds = parse_list(args.seeds, int) if args.seeds else ([0] if args.quick else [0, 1, 2])
    if args.val_per_class is None:
        args.val_per_class = 20 if args.quick else 500
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return args


def preset_amounts() -> list[tuple[str, float]]:
    from simclrv2 import config

    preset = config.build("pipeline")
    return ([("per_class", int(n)) for n in preset.labels_per_class] +
            [("fraction", float(f)) for f in preset.label_fractions])


def select_amounts(available: list[tuple[str, float]], wanted: Optional[str], quick: bool) -> list[tuple[str, float]]:
    if wanted is None:
        return available[:1] if quick else available
    names = {amount_name(a): a for a in available}
    chosen = []
    for name in parse_list(wanted, str):
        if name not in names:
            raise SystemExit(f"paper_findings: error: --amounts: no label amount {name!r}; choose from {sorted(names)}")
        chosen.append(names[name])
    return chosen


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    amounts = select_amounts(preset_amounts(), args.amounts, args.quick)
    study = Study(args.out.resolve(), args.seeds, amounts, args.quick, args.val_per_class)
    collectors = {k: FINDINGS[k][3](study) for k in args.findings}
    claim_study(study.out, {"quick": args.quick, "val_per_class": args.val_per_class})
    if study.data_dir is not None:
        write_quick_data(study.data_dir)
    write_label_files(study)
    runner = Runner(study.out, args.jobs, study.data_dir)
    runner.run_all(study.tasks)
    findings = {}
    for k, collect in collectors.items():
        title, paper, measure, _ = FINDINGS[k]
        findings[str(k)] = {"title": title, "paper": paper, "measure": measure, **collect()}
    runs = {folder: json.loads(runner.record(task).read_text()) for folder, task in sorted(study.tasks.items())}
    results = {
        "quick": args.quick, "seeds": args.seeds, "label_amounts": [amount_name(a) for a in amounts],
        "val_per_class": args.val_per_class, "machine": machine(),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "run_seconds_total": round(sum(r["seconds"] for r in runs.values()), 1),
        "findings": findings, "runs": runs,
    }
    write_atomic(study.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(study.out / "results.md", markdown(results) + "\n")
    for k, finding in findings.items():
        plot(finding, study.out / f"finding-{k}.png")
    print(f"[paper_findings] wrote {study.out / 'results.json'}, results.md and finding-*.png "
          f"in {results['wall_time_s']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
