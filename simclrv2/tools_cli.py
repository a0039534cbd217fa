"""Tool commands beside the stages (conversion, export, reports): name -> (help, add_arguments, run)."""
from __future__ import annotations

import argparse
from typing import Callable

TOOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
