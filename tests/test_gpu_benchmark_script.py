"""``benchmarks/gpu.py`` runs once per lent GPU session, so its checks must be right before it
gets there: here its CPU dry-run pieces are checked against independent computations."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_gpu_script():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_gpu", BENCHMARKS / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


gpu = _load_gpu_script()


def _nt_xent_grad_float64(h: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gradient of mean_i(CE_a,i + CE_b,i) from the textbook 2B x 2B similarity matrix."""
    x = h.double().clone().requires_grad_(True)
    b = x.shape[0] // 2
    z = torch.nn.functional.normalize(x, dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    (torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / b).backward()
    return x.grad


def test_correctness_section_passes_on_the_cpu_with_one_gradient_per_device():
    # The first GPU run found the CPU leaf reused for the device copy; in a dry run both "devices"
    # shared one tensor, so its gradient was accumulated twice and the comparison still passed.
    out = gpu.correctness(torch.device("cpu"), dry_run=True)
    assert out["all_ok"], out
    h = torch.randn(128, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    expected = _nt_xent_grad_float64(h, 0.1).abs().max().item()
    assert out["nt_xent"]["grad_max_abs"] == pytest.approx(expected, rel=1e-5)


def test_oom_retry_halves_the_batch_until_it_fits_and_gives_up_below_the_minimum():
    tried = []

    def fits_at_32(batch: int) -> dict:
        tried.append(batch)
        if batch > 32:
            raise torch.OutOfMemoryError(f"batch {batch}")
        return {"batch": batch}

    assert gpu.with_oom_retry(fits_at_32, 128, 8) == {"batch": 32, "oom_retries": [128, 64]}
    assert tried == [128, 64, 32]
    with pytest.raises(torch.OutOfMemoryError):
        gpu.with_oom_retry(fits_at_32, 128, 100)


def test_throughput_reports_each_phase_of_the_step():
    out = gpu.throughput(depth=18, width=0.125, cifar_stem=True, image_size=16, source_size=20, batch=4,
                         warmup=1, steps=1, device=torch.device("cpu"), dtype=None, blur=False)
    assert out["views_per_s"] == pytest.approx(2 * out["images_per_s"])
    assert out["loss_finite"]
    for phase in ("augment_s_per_step", "forward_backward_s_per_step", "optimizer_s_per_step"):
        assert 0 < out[phase] < 60


def test_stages_section_runs_every_command_and_checks_their_outputs():
    out = gpu.stages_check(torch.device("cpu"))
    assert out["ok"], out
    assert set(out["exit_codes"]) == {"pipeline", "evaluate", "export_safetensors", "export_onnx"}
    for stages in out["report_top1"].values():
        assert set(stages) >= {"baseline", "linear_eval", "finetuned", "distilled"}
        assert all(0 <= top1 <= 100 for top1 in stages.values())


def test_kernel_profile_reports_shares_of_the_device_time():
    spec = dict(depth=18, width=0.125, cifar_stem=True, image_size=16, source_size=20, dtype=None, blur=False)
    out = gpu.kernel_profile(spec, batch=4, device=torch.device("cpu"), steps=1)
    shares = [share for _, share in out["top"]]
    assert 0 < len(shares) <= 12 and shares == sorted(shares, reverse=True)
    assert all(0 <= share <= 1 for share in shares) and sum(shares) <= 1.0001
    assert any("convolution" in name for name, _ in out["top"])
