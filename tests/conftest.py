"""Shared pytest fixtures.

The official-code fixtures live in ``../shared/reference`` beside the project root (or wherever
``SIMCLRV2_SHARED`` points). Tests that need them take the ``reference_dir`` fixture and are
skipped cleanly when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("SIMCLRV2_SHARED", PROJECT_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``shared/reference`` produced by the official TensorFlow code; skips when absent."""
    path = _shared_dir() / "reference"
    if not path.is_dir():
        pytest.skip(f"official reference fixtures not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
