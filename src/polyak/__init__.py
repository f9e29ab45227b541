"""polyak: weight averaging for PyTorch training, exact and fast."""

from __future__ import annotations

import importlib
from typing import Any

from polyak import schedules
from polyak.ema import EMA
from polyak.integrations.hook import attach

__version__ = "0.1.0"

__all__ = ["EMA", "__version__", "attach", "schedules"]

_LAZY = ("tf", "bn", "io", "averagers", "posthoc", "distributed", "errors")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"polyak.{name}")
    raise AttributeError(f"module 'polyak' has no attribute {name!r}")
