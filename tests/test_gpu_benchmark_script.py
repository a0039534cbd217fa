"""``benchmarks/gpu.py`` runs once per lent GPU session, so its pieces are checked here on the CPU
at tiny sizes: the engine's loop timed, the kernel shares, and the largest batch that fits."""
import functools
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
TINY = dict(gpu.TINY, size=16, source=20, batch=4, warmup=1, steps=1)


@pytest.fixture
def one_thread(monkeypatch):
    """One thread, as the stage tests run: tiny ops on a busy machine's OpenMP threads crawl."""
    monkeypatch.setattr(gpu, "RuntimeConfig", functools.partial(gpu.RuntimeConfig, num_threads=1))


def test_largest_fitting_halves_the_batch_until_it_fits_and_gives_up_below_the_minimum(monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "empty_cache", lambda: None)
    tried = []

    def fits_at_32(batch: int) -> dict:
        tried.append(batch)
        if batch > 32:
            raise torch.OutOfMemoryError(f"batch {batch}")
        return {"batch": batch}

    assert gpu.largest_fitting(fits_at_32, 128, 8) == {"batch": 32, "oom_at": [128, 64]}
    assert tried == [128, 64, 32]
    with pytest.raises(torch.OutOfMemoryError):
        gpu.largest_fitting(fits_at_32, 128, 100)


def test_throughput_times_the_engine_loop_and_the_views_alone(one_thread):
    out = gpu.throughput(TINY, 4, "cpu", precision="fp32")
    assert out["views_per_s"] == pytest.approx(2 * out["images_per_s"]) and out["images_per_s"] > 0
    assert 0 < out["augment_s_per_step"] < 60 and 0 < out["augment_host_enqueue_s"] <= out["augment_s_per_step"]
    assert out["augment_fraction"] == pytest.approx(out["augment_s_per_step"] / out["s_per_step"])


def test_kernel_profile_reports_shares_of_the_profiled_steps(one_thread):
    shares = gpu.throughput(TINY, 4, "cpu", precision="fp32", profile=True)["top"]
    values = [share for _, share in shares]
    assert 0 < len(values) <= 12 and values == sorted(values, reverse=True) and sum(values) <= 1.0001
    assert any("convolution" in name for name, _ in shares)
