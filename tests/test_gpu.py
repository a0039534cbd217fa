"""CUDA correctness, resume and every command on the GPU: ``python -m pytest -m gpu``.

The ``cuda`` cases carry the ``gpu`` marker and skip without CUDA; where a check also means
something on the CPU, its ``cpu`` case runs in the ordinary suite. ``benchmarks/gpu_session.sh``
runs the ``gpu`` cases in a lent GPU session. CUDA results are compared with the CPU with TF32 off.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import simclrv2
from simclrv2.cli import main as cli
from simclrv2.config import RuntimeConfig
from simclrv2.data import SimCLRAugment, finetune_augment
from simclrv2.engine.runtime import prepare_model, setup_runtime
from simclrv2.engine.trainer import TrainTask, train
from simclrv2.export import export_model
from simclrv2.losses import nt_xent
from simclrv2.optim import LARS, lars_param_groups
from tiny_data import write_tiny_fashion_mnist

GPU, NEEDS_CUDA = pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BOTH = ["cpu", pytest.param("cuda", marks=[GPU, NEEDS_CUDA])]
FAST = ["--progress", "false", "--eval-batch-size", "64", "--num-threads", "1"]
TINY = ["--width-multiplier", "0.125", "--train-batch-size", "32", *FAST]


@pytest.fixture(autouse=True)
def _no_tf32_one_thread():
    """TF32 off for the comparisons; one CPU thread, as the stage tests run (tiny ops crawl on a
    busy machine's OpenMP threads)."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(1)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, threads = previous
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=128, n_test=64)


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


def _nt_xent_grad_float64(h: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gradient of mean_i(CE_a,i + CE_b,i) from the textbook 2B x 2B similarity matrix."""
    x = h.double().clone().requires_grad_(True)
    b = x.shape[0] // 2
    z = torch.nn.functional.normalize(x, dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    (torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / b).backward()
    return x.grad


@pytest.mark.parametrize("device", BOTH)
def test_nt_xent_loss_and_gradient_match_float64(device):
    # A fresh leaf per device: the first GPU run reused the CPU leaf, which was no leaf on CUDA.
    h = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    x = h.to(device, copy=True).requires_grad_(True)
    loss = nt_xent(x, 0.1)[0]
    loss.backward()
    cpu_loss = nt_xent(h, 0.1)[0]
    assert abs(loss.item() - cpu_loss.item()) < 1e-4
    assert _max_diff(x.grad, _nt_xent_grad_float64(h, 0.1)) < 1e-5


@pytest.mark.parametrize("device", BOTH)
def test_one_training_step_matches_the_cpu(device):
    views = SimCLRAugment(32, use_blur=False).views(_images(16, 32, 3), 2, torch.Generator().manual_seed(5))
    states, losses = [], []
    for dev in ("cpu", device):
        torch.manual_seed(7)
        model = simclrv2.create_model("r18_0p25x_sk0_cifar", num_classes=None).to(dev).train()
        optimizer = LARS(lars_param_groups(model, 1e-6), lr=0.3, momentum=0.9, weight_decay=1e-6)
        loss = nt_xent(model(views.to(dev))[0], 0.1)[0]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        states.append({k: v for k, v in model.state_dict().items() if v.is_floating_point()})
    assert abs(losses[0] - losses[1]) < 1e-3
    assert max(_max_diff(states[0][k], states[1][k]) for k in states[0]) < 1e-4


@pytest.mark.parametrize("device", BOTH)
@pytest.mark.parametrize("size, source, blur", [(32, 32, False), (96, 112, True), (224, 256, True)])
def test_augmentation_matches_the_cpu_for_the_same_parameters(device, size, source, blur):
    augment, images = SimCLRAugment(size, use_blur=blur), _images(32, source, size)
    params = augment.sample_params(32, source, source, torch.Generator().manual_seed(size))
    on_cpu = augment.apply(images, params)
    on_device = augment.apply(images.to(device), params.to(device))
    from_host = augment.apply(images.to(device), params)  # the stages' path: parameters drawn on the host
    drawn = augment(images.to(device), torch.Generator().manual_seed(0))
    assert on_device.dtype == drawn.dtype == torch.float32 and on_device.device.type == device
    assert 0.0 <= float(drawn.min()) and float(drawn.max()) <= 1.0
    assert _max_diff(on_cpu, on_device) < 1e-3 and _max_diff(on_cpu, from_host) < 1e-3


@pytest.mark.parametrize("device", BOTH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_augmentation_under_autocast_stays_float32_and_finite(device, dtype):
    # The loop makes its views inside the step's autocast region; fp16 cannot hold the colour
    # ops' 1e-12 guards, so a grey image (zero chroma, the guarded division) would give NaNs.
    augment, images = SimCLRAugment(32, use_blur=False), _images(64, 32, 4).to(device)
    images[:8] = 128
    expected = augment(images, torch.Generator().manual_seed(2))
    with torch.autocast(device, dtype=dtype):
        views = augment(images, torch.Generator().manual_seed(2))
    assert views.dtype == torch.float32 and bool(torch.isfinite(views).all())
    assert _max_diff(views, expected) < 1e-3


@GPU
@NEEDS_CUDA
def test_views_never_wait_for_the_gpu():
    # CUDA's sync debug mode turns any wait for the GPU inside PyTorch into an error (waits
    # inside cuDNN stay unseen); parameters come from a host generator, as in the stages.
    views, crops = SimCLRAugment(32, use_blur=True), finetune_augment(32)
    images, generator = _images(64, 40, 0).cuda(), torch.Generator().manual_seed(0)
    views.views(images, 2, generator)  # first calls fill per-device caches
    crops(images, generator)
    torch.cuda.synchronize()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views.views(images, 2, generator)
        crops(images, generator)
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@GPU
@NEEDS_CUDA
def test_fp16_steps_in_the_engine_loop_update_the_weights(tmp_path):
    # The GradScaler skips steps while its initial 2**16 scale overflows; within 8 it must find one.
    cfg = RuntimeConfig(device="cuda", precision="fp16", progress=False, log_every_steps=1, checkpoint_steps=10**9)
    rt = setup_runtime(cfg)
    model = simclrv2.create_model("r18_0p25x_sk0_cifar", num_classes=None)
    net = prepare_model(model, rt, global_bn=False, compile_model=False)
    before = [p.detach().clone() for p in model.parameters()]
    augment, images = SimCLRAugment(32, use_blur=False), _images(32, 32, 11).cuda()
    generator = torch.Generator().manual_seed(0)
    task = TrainTask(stage="pretrain", model=net, optimizer=LARS(lars_param_groups(model, 1e-6), lr=0.3),
                     batches=_Repeat(images), step_fn=lambda x, step: (nt_xent(net(augment.views(x, 2, generator))[0],
                                                                                  0.1)[0], {}),
                     lr_fn=lambda step: 0.3, total_steps=8, images_per_step=32, checkpoint_meta={})
    train(task, rt, cfg, tmp_path)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


@GPU
@NEEDS_CUDA
@pytest.mark.parametrize("device", ["cuda"])
def test_a_resumed_pretraining_ends_at_the_weights_of_an_uninterrupted_one(device, data_dir, tmp_path):
    # Random states are restored from CPU tensors; cuDNN may differ run to run (on the CPU the
    # weights are equal exactly, tests/test_reliability.py).
    run = ["pretrain", "--data-dir", str(data_dir), "--device", device, *TINY, "--train-steps", "4",
           "--checkpoint-steps", "2"]
    assert cli([*run, "--run-dir", str(tmp_path / "stopped"), "--max-steps", "2"]) == 0
    assert cli([*run, "--run-dir", str(tmp_path / "stopped")]) == 0
    assert cli([*run, "--run-dir", str(tmp_path / "straight")]) == 0
    resumed, straight = (simclrv2.load(tmp_path / name).state_dict() for name in ("stopped", "straight"))
    diff = max(_max_diff(resumed[k], v) for k, v in straight.items() if v.is_floating_point())
    assert diff < 1e-2


class _Repeat:
    """A batch source that yields one batch forever."""

    def __init__(self, batch: torch.Tensor):
        self.batch = batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return 1000

    def __iter__(self):
        while True:
            yield self.batch


def _last_step(run_dir: Path) -> int:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["step"]


@pytest.mark.parametrize("device", BOTH)
def test_every_command_runs_on_the_device(device, data_dir, tmp_path):
    """``pipeline`` with the MoCo-style memory, then ``evaluate`` and ``export`` of its distilled
    student (by the command, and by the API from the model on the device), and on CUDA
    ``pretrain`` in fp16 with its gradient scaler, stopped and resumed."""
    shared = ["--data-dir", str(data_dir), "--device", device, *FAST]
    assert cli(["pipeline", *shared, "--run-dir", str(tmp_path / "pipeline"), "--pretrain.width-multiplier", "0.125",
                "--pretrain.train-steps", "4", "--pretrain.train-batch-size", "32", "--pretrain.use-memory", "true",
                "--pretrain.memory-size", "64", "--finetune.train-steps", "2", "--baseline.train-steps", "2",
                "--distill.train-steps", "2", "--distill.train-batch-size", "32", "--linear-eval.train-steps", "2",
                "--label-fractions", "0.5"]) == 0
    report = json.loads((tmp_path / "pipeline" / "report.json").read_text())
    for entry in report["label_fractions"].values():
        top1 = {stage: entry[stage]["top1"] for stage in ("baseline", "linear_eval", "finetuned", "distilled")}
        assert all(0 <= value <= 100 for value in top1.values())
    student = next((tmp_path / "pipeline").glob("seed-0/*/distill"))
    assert cli(["evaluate", *shared, "--checkpoint", str(student), "--run-dir", str(tmp_path / "evaluate")]) == 0
    assert 0 <= json.loads((tmp_path / "evaluate" / "eval.json").read_text())["top1"] <= 100
    for fmt in ("safetensors", "onnx"):
        assert cli(["export", "--format", fmt, str(student), str(tmp_path / f"student.{fmt}")]) == 0
    on_device = simclrv2.load(student, device=device)
    export_model(on_device, tmp_path / "on_device.onnx", "onnx", 28)
    assert next(on_device.parameters()).device.type == device  # the export leaves the model where it was
    if device == "cuda":
        fp16 = ["pretrain", *shared, *TINY[:4], "--run-dir", str(tmp_path / "fp16"), "--train-steps", "4",
                "--precision", "fp16", "--checkpoint-steps", "2"]
        assert cli([*fp16, "--max-steps", "2"]) == 0 and cli(fp16) == 0
        assert _last_step(tmp_path / "fp16") == 4
