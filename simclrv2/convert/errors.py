"""The one error type of ``simclrv2.convert``."""
from __future__ import annotations

from simclrv2.engine.checkpoint import CheckpointError


class ConversionError(CheckpointError):
    """An official checkpoint cannot be read or does not map onto a SimCLRv2 model."""
