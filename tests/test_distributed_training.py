"""Data-parallel training on CPUs with gloo: two ranks reproduce one process, end to end.

Model level (two ranks spawned here, compared with the same code run in this process):

* a pretraining step (global BN, NT-Xent with gathered negatives, the supervised head, LARS)
  run through the shared training loop on 2 ranks x B/2 fixed views gives the loss and the
  updated weights and BN statistics of 1 process with the B views;
* the same for the MoCo variant: losses, queue contents (which wraps around) and momentum
  network after a few steps;
* global batch norm: statistics, running averages and gradients of the concatenated batch;
* evaluation over 2 ranks of a split whose size is odd counts every example once, with
  ranks running different numbers of batches;
* resuming: rank 0 chooses the checkpoint and every rank loads it, even where another rank does
  not list it yet; a rank that cannot read it stops every rank with one message.

Launcher level: ``torchrun --nproc_per_node 2`` runs every stage on tiny data (one pretrain
run, interrupted by ``--max-steps`` and resumed, shared by the later stages), writes one set of
outputs from rank 0 only, and its evaluation equals a single process's.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import struct
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from simclrv2 import cli
from simclrv2 import distributed as D
from simclrv2.data import batches as B
from simclrv2.data.in_memory import TensorImageDataset
from simclrv2.engine.evaluation import evaluate_classifier, topk_hits
from simclrv2.config import ConfigError, OptimConfig, RuntimeConfig
from simclrv2.engine.runtime import (Runtime, pick_device, pick_dtype, cpu_supports_bf16, prepare_model,
                                     setup_runtime, to_device_images, unwrap)
from simclrv2.data.batches import TensorBatches
from simclrv2.engine import checkpoint as ckpt_lib
from simclrv2.engine.checkpoint import CheckpointError
from simclrv2.engine.trainer import TrainTask, train
from simclrv2.losses import l2_normalize, moco_contrastive_loss, nt_xent
from simclrv2.losses.memory import FeatureQueue, ema_update_
from simclrv2.models import build_simclrv2_model, frozen_copy
from simclrv2.optim.factory import build_optimizer, labelled_loss_weight_decay

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BATCH = 8  # global batch; each rank holds BATCH // WORLD images (two views each)
IMAGE = 8
STEPS = 2
MOCO_STEPS = 3
QUEUE = 20  # < keys per step * steps, so the queue wraps around
NUM_CLASSES = 10
EVAL_SIZE = 21  # odd: rank 0 gets 11 examples, rank 1 gets 10
EVAL_BATCH = 5  # 3 batches on rank 0, 2 on rank 1
TEMPERATURE = 0.2
MODEL = dict(resnet_depth=18, width_multiplier=0.125, cifar_stem=True, num_proj_layers=3, proj_out_dim=16,
             ft_proj_selector=1)
OPTIM = OptimConfig(optimizer="lars", weight_decay=1e-4, momentum=0.9)
LR = 0.5
DTYPE = torch.float64  # float32 round-off, amplified by a few LARS steps, would hide small errors


# --------------------------------------------------------------------------- model-level runs


class _FixedBatches:
    """A batch source over pre-made global batches, yielding this rank's contiguous share."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]], rank: int, world: int):
        self.batches = [tuple(_share(t, rank, world) for t in batch) for batch in batches]
        self.start = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.start:])


def _share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows ``[rank * n, (rank + 1) * n)`` of a global batch: rank order = single-process order."""
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def _runtime_cfg(run_dir: Path) -> RuntimeConfig:
    return RuntimeConfig(run_dir=str(run_dir), progress=False, resume=False, log_every_steps=1,
                         checkpoint_steps=10_000, precision="fp32")


def _pretrain_run(data: dict, rt: Runtime, run_dir: Path) -> dict:
    """Pretraining steps as the pretrain stage takes them (NT-Xent + supervised head, LARS)."""
    model = build_simclrv2_model(**MODEL, num_classes=NUM_CLASSES).to(DTYPE)
    model.load_state_dict(data["init"])
    net = prepare_model(model, rt, global_bn=True, compile_model=False)
    optimizer = build_optimizer(model, OPTIM)
    losses: list[torch.Tensor] = []

    def step_fn(batch, step):
        view1, view2, labels = batch
        projection, logits = net(to_device_images(torch.cat([view1, view2]), rt))
        contrast, _, _ = nt_xent(projection, TEMPERATURE)
        sup = F.cross_entropy(logits, torch.cat([labels, labels]))
        loss = contrast + sup + labelled_loss_weight_decay(model, OPTIM)
        losses.append(D.all_reduce_mean(loss))
        return loss, {}

    task = TrainTask(stage="pretrain", model=net, optimizer=optimizer,
                     batches=_FixedBatches(data["batches"], rt.rank, rt.world_size), step_fn=step_fn,
                     lr_fn=lambda step: LR, total_steps=STEPS, images_per_step=BATCH, checkpoint_meta={})
    train(task, rt, _runtime_cfg(run_dir), run_dir)
    return {"losses": torch.stack(losses), "state": unwrap(net).state_dict(), "net": net}


def _moco_run(data: dict, rt: Runtime, run_dir: Path) -> dict:
    """MoCo pretraining steps as the pretrain stage takes them; after each optimiser step the
    momentum keys of all ranks are enqueued in single-process order (view 1 of every rank, then view 2)."""
    model = build_simclrv2_model(**MODEL).to(DTYPE)
    model.load_state_dict({k: v for k, v in data["init"].items() if not k.startswith("supervised_head.")})
    net = prepare_model(model, rt, global_bn=True, compile_model=False)
    optimizer = build_optimizer(model, OPTIM)
    momentum_net = frozen_copy(unwrap(net))
    queue = FeatureQueue(QUEUE, MODEL["proj_out_dim"]).to(DTYPE)
    losses: list[torch.Tensor] = []
    new_keys: list[torch.Tensor] = []

    def step_fn(batch, step):
        view1, view2, _ = batch
        views = to_device_images(torch.cat([view1, view2]), rt)
        projection, _ = net(views)
        with torch.no_grad():
            keys = l2_normalize(momentum_net(views)[0])
        q1, q2 = projection.chunk(2)
        k1, k2 = keys.chunk(2)
        loss, _, _ = moco_contrastive_loss(q1, q2, k1, k2, queue.filled(), TEMPERATURE)
        new_keys[:] = [k1, k2]
        losses.append(D.all_reduce_mean(loss))
        return loss, {}

    def after_step(step):
        queue.enqueue(torch.cat([D.all_gather_nograd(k) for k in new_keys]))
        ema_update_(momentum_net, unwrap(net), 0.9)

    task = TrainTask(stage="pretrain", model=net, optimizer=optimizer,
                     batches=_FixedBatches(data["moco_batches"], rt.rank, rt.world_size), step_fn=step_fn,
                     lr_fn=lambda step: LR, total_steps=MOCO_STEPS, images_per_step=BATCH, checkpoint_meta={},
                     after_step=after_step)
    train(task, rt, _runtime_cfg(run_dir), run_dir)
    return {"losses": torch.stack(losses), "queue": queue.filled().clone(), "ptr": int(queue.ptr),
            "num_filled": int(queue.num_filled), "momentum": momentum_net.state_dict(),
            "state": unwrap(net).state_dict()}


def _global_bn_case(data: dict, rank: int, world: int) -> dict:
    """Output, running statistics and gradients of one global-BN layer on this rank's rows."""
    layer = nn.BatchNorm2d(3, momentum=0.3)
    layer.weight.data.copy_(data["bn_weight"])
    layer.bias.data.copy_(data["bn_bias"])
    if world > 1:
        layer = D.convert_global_batchnorm(layer)
    x = _share(data["bn_x"], rank, world).clone().requires_grad_(True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: bf16 in and out
        y_bf16 = copy.deepcopy(layer)(x.bfloat16())
    y = layer(x)
    (y * _share(data["bn_dy"], rank, world)).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "w_grad": layer.weight.grad, "b_grad": layer.bias.grad,
            "running_mean": layer.running_mean.clone(), "running_var": layer.running_var.clone(), "y_bf16": y_bf16}


def _eval_dataset() -> TensorImageDataset:
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (EVAL_SIZE, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=gen)
    images[:, 0, 0, 0] = torch.arange(EVAL_SIZE, dtype=torch.uint8)  # the example's id
    labels = torch.randint(0, NUM_CLASSES, (EVAL_SIZE,), generator=gen)
    return TensorImageDataset(images, labels, tuple(str(i) for i in range(NUM_CLASSES)), "eval")


def _eval_case(net: nn.Module, rt: Runtime) -> dict:
    """Sharded evaluation of the trained network (global BN + DDP, eval mode) and what it saw."""
    dataset = _eval_dataset()
    net.eval()

    def preprocess(images):
        return images.to(DTYPE) / 255.0

    result = evaluate_classifier(lambda x: net(x)[1], B.eval_batches(dataset, EVAL_BATCH, rt), rt, preprocess)
    ids = torch.cat([images[:, 0, 0, 0].long() for images, _ in
                     B.eval_batches(dataset, EVAL_BATCH, rt)])
    with torch.no_grad():  # every example on this rank, unsharded: the expected counts
        logits = net(to_device_images(preprocess(dataset.images), rt))[1]
    top1, top5 = topk_hits(logits, dataset.labels).tolist()
    return {"result": result, "ids": D.all_gather_variable(ids), "local_ids": ids,
            "expected": (100.0 * top1 / EVAL_SIZE, 100.0 * top5 / EVAL_SIZE)}


def _resume_case(rt: Runtime, run_dir: Path) -> dict:
    """The steps each rank resumes from when its own listing lags behind rank 0's (as on a shared
    filesystem), and the errors when it cannot read rank 0's choice at all."""
    def toy_train(max_steps: int) -> int:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        task = TrainTask(stage="toy", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         batches=TensorBatches(torch.randn(64, 4), torch.randint(0, 2, (64,)), 8),
                         step_fn=lambda batch, step: (F.cross_entropy(model(batch[0]), batch[1]), {}),
                         lr_fn=lambda step: 0.1, total_steps=8, images_per_step=8, checkpoint_meta={})
        return train(task, rt, RuntimeConfig(progress=False, checkpoint_steps=2, max_steps=max_steps), run_dir)["step"]

    toy_train(max_steps=4)  # ckpt-2 and ckpt-4
    listed, loaded = ckpt_lib.step_checkpoints, ckpt_lib.load_checkpoint
    if rt.rank == 1:  # ckpt-4 is not listed here yet
        ckpt_lib.step_checkpoints = lambda folder: [p for p in listed(folder) if p.name != "ckpt-000000004.pt"]
    out: dict = {"lagging_step": toy_train(max_steps=2)}  # resumes, takes no step, saves again
    if rt.rank == 1:  # nor can it be read here
        def unreadable(path, map_location="cpu"):
            if Path(path).name == "ckpt-000000004.pt":
                raise CheckpointError(f"checkpoint {path} does not exist")
            return loaded(path, map_location)
        ckpt_lib.load_checkpoint = unreadable
    try:
        toy_train(max_steps=2)
    except CheckpointError as err:
        out["unreadable"] = str(err)
    finally:
        ckpt_lib.step_checkpoints, ckpt_lib.load_checkpoint = listed, loaded
    return out


def _worker(rank: int, tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        data = torch.load(os.path.join(tmpdir, "inputs.pt"))
        rt = Runtime(torch.device("cpu"), None, True, rank, WORLD)
        out = {"bn": _global_bn_case(data, rank, WORLD), "broadcast": D.broadcast_object(f"from rank {rank}")}
        pre = _pretrain_run(data, rt, Path(tmpdir) / "pretrain")
        out.update(pretrain={k: v for k, v in pre.items() if k != "net"}, eval=_eval_case(pre["net"], rt),
                   bn_types=sorted({type(m).__name__ for m in unwrap(pre["net"]).modules()
                                    if isinstance(m, nn.modules.batchnorm._BatchNorm)}),
                   ddp=isinstance(pre["net"], nn.parallel.DistributedDataParallel))
        out["moco"] = _moco_run(data, rt, Path(tmpdir) / "moco")
        out["resume"] = _resume_case(rt, Path(tmpdir) / "resume")
        if rank == 0:  # a user's own code loading a model on one rank only: no collective inside
            out["alone"] = ckpt_lib.resolve_checkpoint(str(Path(tmpdir) / "pretrain")).name
        out["paired"] = D.broadcast_object(f"after, from rank {rank}")
        torch.save(out, os.path.join(tmpdir, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _views(gen: torch.Generator, steps: int) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.rand(BATCH, 3, IMAGE, IMAGE, generator=gen, dtype=DTYPE),
             torch.rand(BATCH, 3, IMAGE, IMAGE, generator=gen, dtype=DTYPE),
             torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)) for _ in range(steps)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(inputs, outputs of the 2 ranks, outputs of 1 process) for the model-level checks."""
    tmpdir = tmp_path_factory.mktemp("ddp")
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(3)
    data = {"init": build_simclrv2_model(**MODEL, num_classes=NUM_CLASSES).state_dict(),
            "batches": _views(gen, STEPS), "moco_batches": _views(gen, MOCO_STEPS),
            "bn_x": torch.randn(6, 3, 4, 5, generator=gen) * 3 + 2, "bn_dy": torch.randn(6, 3, 4, 5, generator=gen),
            "bn_weight": torch.rand(3, generator=gen) + 0.5, "bn_bias": torch.randn(3, generator=gen)}
    torch.save(data, tmpdir / "inputs.pt")
    mp.spawn(_worker, args=(str(tmpdir),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmpdir / f"out{r}.pt") for r in range(WORLD)]
    one = Runtime(torch.device("cpu"), None, True, 0, 1)
    single = {"bn": _global_bn_case(data, 0, 1)}
    pre = _pretrain_run(data, one, tmpdir / "single-pretrain")
    single.update(pretrain=pre, moco=_moco_run(data, one, tmpdir / "single-moco"), net=pre["net"])
    return data, ranks, single


def _assert_states_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_ranks_use_global_bn_and_ddp(runs):
    _, ranks, _ = runs
    for out in ranks:
        assert out["bn_types"] == ["GlobalBatchNorm"]
        assert out["ddp"]
        assert out["broadcast"] == "from rank 0"


def test_global_bn_matches_the_concatenated_batch(runs):
    data, ranks, single = runs
    want = single["bn"]
    # float64 recomputation of the forward pass from the definition
    x = data["bn_x"].double()
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + 1e-5) * data["bn_weight"].double().view(1, 3, 1, 1) \
        + data["bn_bias"].double().view(1, 3, 1, 1)
    torch.testing.assert_close(want["y"].double(), y, rtol=1e-5, atol=1e-5)
    for r, out in enumerate(ranks):
        got = out["bn"]
        torch.testing.assert_close(got["y"], _share(want["y"], r, WORLD), rtol=1e-5, atol=1e-5)
        # the input gradient includes every rank's loss through the shared statistics
        torch.testing.assert_close(got["x_grad"], _share(want["x_grad"], r, WORLD), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["running_mean"], want["running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["running_var"], want["running_var"], rtol=1e-5, atol=1e-6)
        assert got["y_bf16"].dtype == torch.bfloat16
        torch.testing.assert_close(got["y_bf16"].float(), got["y"], rtol=0.02, atol=0.05)
    # weight/bias gradients are local; DDP's average over ranks is the single-process gradient / world
    for key in ("w_grad", "b_grad"):
        torch.testing.assert_close(sum(out["bn"][key] for out in ranks), want[key], rtol=1e-4, atol=1e-5)


def test_pretraining_steps_match_one_process(runs):
    data, ranks, single = runs
    for out in ranks:
        torch.testing.assert_close(out["pretrain"]["losses"], single["pretrain"]["losses"], rtol=1e-10, atol=0)
        _assert_states_close(out["pretrain"]["state"], single["pretrain"]["state"])
    moved = [name for name, p in single["net"].named_parameters()
             if not torch.equal(p.detach(), data["init"][name])]
    assert len(moved) > 0.9 * len(list(single["net"].parameters()))  # the comparison is not vacuous


def test_moco_queue_and_momentum_network_match_one_process(runs):
    _, ranks, single = runs
    want = single["moco"]
    assert want["num_filled"] == QUEUE and want["ptr"] == (MOCO_STEPS * 2 * BATCH) % QUEUE
    for out in ranks:
        got = out["moco"]
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-10, atol=0)
        assert (got["ptr"], got["num_filled"]) == (want["ptr"], want["num_filled"])
        torch.testing.assert_close(got["queue"], want["queue"], rtol=1e-9, atol=1e-10)
        _assert_states_close(got["momentum"], want["momentum"])
        _assert_states_close(got["state"], want["state"])


def test_evaluation_counts_every_example_once(runs):
    _, ranks, _ = runs
    assert [len(out["eval"]["local_ids"]) for out in ranks] == [11, 10]
    for out in ranks:
        ev = out["eval"]
        assert sorted(ev["ids"].tolist()) == list(range(EVAL_SIZE))
        assert ev["result"]["num_examples"] == EVAL_SIZE
        assert (ev["result"]["top1"], ev["result"]["top5"]) == pytest.approx(ev["expected"], abs=1e-9)
    assert ranks[0]["eval"]["result"] == ranks[1]["eval"]["result"]


def test_one_rank_alone_can_resolve_a_run_folder(runs):
    _, ranks, _ = runs
    assert ranks[0]["alone"].startswith("ckpt-")
    assert [out["paired"] for out in ranks] == ["after, from rank 0"] * WORLD  # collectives still paired


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(runs):
    _, ranks, _ = runs
    assert [out["resume"]["lagging_step"] for out in ranks] == [4, 4]
    messages = [out["resume"].get("unreadable") for out in ranks]
    assert messages[0] == messages[1] and messages[0].startswith("rank 1 cannot read ")
    assert "ckpt-000000004.pt, the checkpoint rank 0 resumes from" in messages[0]


def test_global_bn_is_plain_bn_in_one_process():
    layer = D.convert_global_batchnorm(nn.Sequential(nn.BatchNorm1d(4)))
    reference = nn.BatchNorm1d(4)
    x = torch.randn(6, 4)
    assert isinstance(layer[0], D.GlobalBatchNorm)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer[0].running_var, reference.running_var)


def test_convert_global_batchnorm_keeps_parameters_and_head_without_bias():
    model = build_simclrv2_model(**MODEL)
    params = {name: p for name, p in model.named_parameters()}
    converted = D.convert_global_batchnorm(model)
    assert converted is model
    assert {name: p for name, p in model.named_parameters()} == params
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, D.GlobalBatchNorm) for m in norms)
    assert any(m.bias is None for m in norms)  # the head's last BN has no beta (TF center=False)


def test_single_process_runtime_needs_no_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    try:
        rt = setup_runtime(RuntimeConfig(device="cpu", precision="fp32", num_threads=1))
    finally:
        torch.set_num_threads(threads)
    assert (rt.rank, rt.world_size, rt.is_main, rt.dtype) == (0, 1, True, None)
    assert not dist.is_initialized()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert prepare_model(model, rt, global_bn=True, compile_model=False) is model  # no DDP, no global BN
    assert isinstance(model[1], nn.BatchNorm2d) and not isinstance(model[1], D.GlobalBatchNorm)


def test_precision_and_device_defaults():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if cpu_supports_bf16() else None)
    assert pick_dtype("fp32", cpu) is None and pick_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        pick_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="--device tpu"):
        pick_device("tpu", 0)
    assert Runtime(cpu, torch.bfloat16, False, 0, 1).grad_scaler() is None  # only fp16 (CUDA) scales the loss
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device("cuda", 0)


def test_auto_precision_uses_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    for capability, auto in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                             ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert pick_dtype("auto", gpu) is auto
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.warns(UserWarning, match="Tesla V100 has no native bf16.*--precision fp16"):
        assert pick_dtype("bf16", gpu) is torch.bfloat16
    assert pick_dtype("fp16", gpu) is torch.float16


def test_auto_device_checks_local_rank_against_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", 1, world=2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="cuda:2 does not exist: 2 GPU"):
        pick_device("auto", 2, world=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 2, world=3) == torch.device("cpu")


# --------------------------------------------------------------------------- torchrun end to end

TRAIN_SIZE, E2E_IMAGE = 32, 12
TINY = ["--dataset", "fashion_mnist", "--device", "cpu", "--progress", "false", "--precision", "fp32",
        "--log-every-steps", "1", "--eval-batch-size", "8"]  # gloo on CPUs, also on machines with GPUs


def _write_idx(directory: Path, prefix: str, n: int, gen: torch.Generator) -> None:
    images = torch.randint(0, 256, (n, E2E_IMAGE, E2E_IMAGE), dtype=torch.uint8, generator=gen)
    labels = (torch.arange(n) % 10).to(torch.uint8)
    with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, E2E_IMAGE, E2E_IMAGE) + images.numpy().tobytes())
    with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.numpy().tobytes())


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    proc = subprocess.run(launcher + ["-m", "simclrv2"] + args, cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(args[:1])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _assert_written_once(run_dir: Path, proc: subprocess.CompletedProcess, steps: int, launches: int = 1) -> None:
    """One writer: one TensorBoard file per launch, one metrics line per step, one summary on stdout."""
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == launches
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, steps + 1))
    assert proc.stdout.count(" done ==") == 1 and "world_size=2" in proc.stdout
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert json.loads((run_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Tiny Fashion-MNIST-format data and a 2-rank pretraining run (stopped after 1 step, then resumed)."""
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(5)
    _write_idx(data, "train", TRAIN_SIZE, gen)
    _write_idx(data, "t10k", EVAL_SIZE, gen)
    common = TINY + ["--data-dir", str(data)]
    pre = root / "pretrain"
    args = ["pretrain", *common, "--run-dir", str(pre), "--train-batch-size", "8", "--train-steps", "2",
            "--use-memory", "true", "--memory-size", "24"]
    first = _launch(args + ["--max-steps", "1"])
    assert "resuming" not in first.stdout
    second = _launch(args)
    straight = root / "pretrain-uninterrupted"
    _launch([*args[:args.index("--run-dir")], "--run-dir", str(straight), *args[args.index("--run-dir") + 2:]])
    return {"root": root, "common": common, "pretrain": pre, "first": first, "second": second, "straight": straight}


def test_torchrun_pretrain_resumes_and_writes_once(e2e):
    second = e2e["second"]
    assert second.stdout.count("resuming pretrain from") == 1  # every rank resumed, rank 0 said so
    _assert_written_once(e2e["pretrain"], second, steps=2, launches=2)
    ckpt = torch.load(e2e["pretrain"] / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 2 and int(ckpt["state"]["memory_queue"]["num_filled"]) == min(24, 2 * 2 * 8)
    assert not any(".module." in k or k.startswith("module.") for k in ckpt["model"])
    # Each rank resumed its own augmentation and RNG draws: the same weights as without the stop.
    straight = torch.load(e2e["straight"] / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert len(ckpt["rank_randomness"]) == 2
    assert not torch.equal(ckpt["rank_randomness"][0]["generators"]["augment_rng"]["state"],
                           ckpt["rank_randomness"][1]["generators"]["augment_rng"]["state"])
    for name, value in straight["model"].items():
        assert torch.equal(ckpt["model"][name], value), name


@pytest.fixture(scope="module")
def finetuned(e2e):
    run_dir = e2e["root"] / "finetune"
    proc = _launch(["finetune", *e2e["common"], "--checkpoint", str(e2e["pretrain"]), "--run-dir", str(run_dir),
                    "--train-batch-size", "8", "--train-steps", "2", "--label-fraction", "0.5"])
    return run_dir, proc


def test_torchrun_finetune(finetuned):
    run_dir, proc = finetuned
    _assert_written_once(run_dir, proc, steps=2)
    assert json.loads((run_dir / "eval.json").read_text())["num_examples"] == EVAL_SIZE


def test_torchrun_distill_with_labels(e2e, finetuned):
    run_dir = e2e["root"] / "distill"
    proc = _launch(["distill", *e2e["common"], "--checkpoint", str(finetuned[0]), "--run-dir", str(run_dir),
                    "--train-batch-size", "8", "--train-steps", "2", "--distill-alpha", "0.5",
                    "--label-fraction", "0.5"])
    _assert_written_once(run_dir, proc, steps=2)
    assert json.loads((run_dir / "eval.json").read_text())["num_examples"] == EVAL_SIZE


def test_torchrun_linear_eval(e2e):
    run_dir = e2e["root"] / "linear-eval"
    proc = _launch(["linear-eval", *e2e["common"], "--checkpoint", str(e2e["pretrain"]), "--run-dir", str(run_dir),
                    "--train-batch-size", "8", "--train-steps", "2"])
    _assert_written_once(run_dir, proc, steps=2)
    assert json.loads((run_dir / "eval.json").read_text())["num_examples"] == EVAL_SIZE


def _printed_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])


def test_torchrun_evaluate_equals_one_process(e2e, finetuned, capsys):
    args = ["evaluate", *e2e["common"], "--checkpoint", str(finetuned[0]), "--eval-batch-size", "4"]
    two = _launch(args)
    assert two.stdout.count('"top1"') == 1  # printed by rank 0 only
    threads = torch.get_num_threads()
    try:
        capsys.readouterr()
        with pytest.warns(UserWarning, match="evaluate does not train, so it ignores --log-every-steps"):
            assert cli.main(args) == 0  # the same evaluation in this (single) process, common flags included
    finally:
        torch.set_num_threads(threads)
    one = _printed_json(capsys.readouterr().out)
    assert _printed_json(two.stdout) == one
    assert one["num_examples"] == EVAL_SIZE
