"""Drop-in replacements for the EMA classes of other libraries, running on :class:`polyak.EMA`.

Change one import line and keep your code, your checkpoints and your numbers:

=====================================================  ===============================================
instead of                                             import
=====================================================  ===============================================
``from torch_ema import ExponentialMovingAverage``     ``from polyak.compat.torch_ema import ExponentialMovingAverage``
``from timm.utils import ModelEmaV2, ModelEmaV3``      ``from polyak.compat.timm import ModelEmaV2, ModelEmaV3``
``from ema_pytorch import EMA``                        ``from polyak.compat.ema_pytorch import EMA``
=====================================================  ===============================================

Each class takes every constructor argument and method of the original at the version named in its
docstring (torch_ema 0.3, timm 1.0.31, ema-pytorch 0.8.3) and gives the same averages, except where
the original is wrong (bf16 shadows that stall, integer buffers truncated, a decay schedule that
counts calls while averaging every ``update_every``-th): each docstring lists those differences.
The update runs on polyak's engine (one multi-tensor pass, fp32 shadows for bf16 and fp16 weights).
None of these modules imports the package it replaces.
"""

__all__ = ["ema_pytorch", "timm", "torch_ema"]
