"""Warm-up + cosine schedule against the official values and hand-computed closed forms."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from simclrv2.optim import num_train_steps, num_warmup_steps, scaled_learning_rate, warmup_cosine_lr


def test_official_cases(reference_dir):
    data = json.loads((reference_dir / "lr_schedule.json").read_text())
    assert len(data["cases"]) == 3
    for case in data["cases"]:
        f = case["flags_used"]
        n = case["num_examples"]
        assert num_warmup_steps(n, f["warmup_epochs"], f["train_batch_size"]) == case["warmup_steps"]
        assert num_train_steps(n, f["train_epochs"], f["train_batch_size"],
                               f["train_steps"]) == case["total_steps"]
        got = [warmup_cosine_lr(s, f["learning_rate"], f["train_batch_size"], n,
                                f["train_epochs"], f["warmup_epochs"],
                                f["learning_rate_scaling"], f["train_steps"])
               for s in case["steps"]]
        np.testing.assert_allclose(got, case["learning_rates"], atol=1e-6, err_msg=case["name"])


# N=1000, batch 100, 10 epochs, 2 warm-up epochs, linear scaling of 0.1:
# scaled = 0.1 * 100 / 256 = 0.0390625, warmup = 20, total = 1000*10//100 + 1 = 101,
# cosine length 81.
ARGS = dict(base_lr=0.1, batch_size=100, num_examples=1000, epochs=10, warmup_epochs=2,
            scaling="linear")
PEAK = 0.0390625


def test_closed_form_by_hand():
    lr = lambda s: warmup_cosine_lr(s, **ARGS)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(10) == pytest.approx(PEAK / 2)
    assert lr(19) == pytest.approx(PEAK * 19 / 20)
    assert lr(20) == pytest.approx(PEAK)                      # warm-up end
    assert lr(20 + 81 / 2) == pytest.approx(PEAK / 2)         # cosine midpoint
    assert lr(20 + 81 / 4) == pytest.approx(PEAK * (1 + math.sqrt(0.5)) / 2)
    assert lr(101) == pytest.approx(0.0, abs=1e-15)           # end
    assert lr(500) == pytest.approx(0.0, abs=1e-15)           # clamped after the end


def test_sqrt_scaling_and_no_warmup():
    args = dict(ARGS, scaling="sqrt", warmup_epochs=0)
    assert scaled_learning_rate(0.1, 100, "sqrt") == pytest.approx(1.0)
    assert warmup_cosine_lr(0, **args) == pytest.approx(1.0)  # pure cosine starts at the peak
    assert warmup_cosine_lr(50.5, **args) == pytest.approx(0.5)


def test_integer_quirks():
    # floor division happens before rounding: 1 * 6700 // 1000 = 6, whereas round(6.7) = 7
    assert num_warmup_steps(6700, 1, 1000) == 6
    assert num_warmup_steps(6700, 0.5, 1000) == 3                 # 3350.0 // 1000 = 3
    assert num_train_steps(6700, 3, 1000) == 21                   # 20100 // 1000 + 1
    assert num_train_steps(6700, 3, 1000, train_steps=7) == 7


def test_total_steps_override():
    args = dict(ARGS, warmup_epochs=0)
    assert warmup_cosine_lr(5, total_steps=10, **args) == pytest.approx(PEAK / 2)
    assert warmup_cosine_lr(10, total_steps=10, **args) == pytest.approx(0.0, abs=1e-15)


def test_warmup_longer_than_run_gives_zero_after_warmup():
    args = dict(ARGS, warmup_epochs=20)  # warm-up 200 steps, run 101 steps
    assert warmup_cosine_lr(100, **args) == pytest.approx(PEAK / 2)
    assert warmup_cosine_lr(250, **args) == 0.0


def test_errors():
    with pytest.raises(ValueError, match="scaling"):
        warmup_cosine_lr(0, **dict(ARGS, scaling="cubic"))
    with pytest.raises(ValueError, match="step"):
        warmup_cosine_lr(-1, **ARGS)
    with pytest.raises(ValueError, match="batch_size"):
        num_train_steps(10, 1, 0)
