"""Speed of one EMA update: polyak's kernels against raw ``torch._foreach_lerp_`` and the peers.

Run from the repository root (``PYTHONPATH=src`` unless polyak is installed):

    PYTHONPATH=src python bench/update_speed.py --device cpu --require-quiet # all, about 6 min
    PYTHONPATH=src python bench/update_speed.py --device cuda --train-step   # the GPU run
    PYTHONPATH=src python bench/update_speed.py --device cpu --quick --workloads resnet50 many_tiny
    PYTHONPATH=src python bench/update_speed.py --list                       # workloads and impls

Peers: ``pip install torch-ema ema-pytorch`` and ``pip install --no-deps timm`` (timm's EMA file,
``timm/utils/model_ema.py``, is loaded by path, so timm and torchvision are never imported; or point
``--timm-file`` at that file from an unpacked wheel).

polyak's drop-in replacements (``polyak.compat``: torch_ema, timm V2/V3, ema-pytorch) get rows of
their own (``compat_*``), configured as their originals' rows are, and a target against the
``polyak`` row of the same kernel: at most 1.05x.

What it does, per workload (``--workloads``; CPU runs use the same tensor counts with fewer elements,
except ResNet-50, which always runs at full size):

1. builds the model and, for every implementation, an EMA of it at the same constant decay
   (``DECAY``; each peer's warm-up switched off as its users would), or an ``unavailable`` /
   ``failed`` row with the reason;
2. warms each one up, then checks what each one really tracks: every floating tensor of the model
   is nudged, each implementation updates once, and each of its shadows is classed as averaged,
   copied, not updated or not tracked; the ``tracked`` column and the tensor and element counts of
   a row come from that check, not from what the implementation claims;
3. times ``update()`` round-robin: each round runs every implementation once, the same number of
   calls for all of them, in an order shuffled afresh each round (seeded), so drift and the cache
   left by the previous implementation hit all alike; median and IQR over the rounds, warm-up
   excluded, and every round's time (and position) in the JSON, so two rows can be compared
   round by round. Where a row's memory lands moves its time by several percent (the
   ``replica`` row, a second raw row, shows how far in the same run), so every implementation
   is built ``--placements`` times (CPU default 3) and round r times set r mod K of all of them;
4. checks the values: the model is shifted, each implementation updates twice more, and each
   shadow must match a float64 lerp of its own previous value at ``DECAY`` (to a tolerance set
   by the shadow dtype); a row that fails, or that tracks another set of tensors than the
   workload's, is marked and counts in no target;
5. sets the floor from an in-place bandwidth probe taken in the same run (``dst.add_(src)`` and
   ``dst.lerp_(src, w)``, 3 transfers each, as a lerp):
   ``floor = (bytes read + bytes written per update) / bandwidth``, with 12 B per element for fp32
   weights and shadows (read weight, read shadow, write shadow), 10 B for bf16 weights with fp32
   shadows and 6 B for bf16 shadows; copied (integer) tensors count read + write. A workload
   small enough to stay in the last-level cache gets its floor marked as not a floor.

The run records the commit and whether the tree had uncommitted changes, the load averages, and
how many cores other processes kept busy before and during the run; above ``--max-load`` the run
is marked loaded (``--require-quiet``: refused).

``--train-step`` (CUDA only) adds the share of a real training step: ViT-B/16, batch 128, 224 px,
fp32 weights, bf16 autocast, fused AdamW, timed with and without each EMA.

Results go to ``bench/results/update_speed_<device>_<date>.json`` (see bench/README.md for the
schema) and a markdown table, then a "targets" section computed from the rows, go to stdout: each
target's ratio is paired round by round, with a 95% bootstrap interval and a verdict of met,
NOT met or within noise (or excluded, where a row failed the value check).
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib.util
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    LoadMonitor,
    cache_bytes,
    fmt_num,
    git_commit,
    load_threshold,
    load_verdict,
    machine_info,
    markdown_table,
    median_iqr,
    memory_bandwidth,
    package_versions,
    paired_ratio,
    round_orders,
    sync,
    time_calls,
    utc_now,
    write_json_atomic,
)
from torch import nn

SCHEMA_VERSION = 2
DECAY = 0.999  # every implementation runs at this constant decay (warm-ups switched off)
PEER_PACKAGES = ("torch-ema", "ema-pytorch", "timm")
RAW = "raw_foreach_lerp"
RAW_LIVE = "live"  # the kernel label of raw _foreach_lerp_ on the nn.Parameters themselves
RAW_CHUNKED = "chunked"  # bf16 params, fp32 shadows: upcast through a persistent chunked scratch
# a second raw row with shadows of its own: the control that shows how far two identical updates
# differ in one run (where their memory landed), the band within which other ratios are noise
RAW_REPLICA = "replica"
PAIRS = "+pairs"  # the kernel label suffix of polyak rows built on (name, tensor) pairs
# the value check (``verify_values``): updates run towards a model shifted by VERIFY_SHIFT
VERIFY_STEPS = 2
VERIFY_SHIFT = 64.0
# a workload whose bytes touched per update are below this many last-level caches may be served
# from the cache: its "floor" from a DRAM bandwidth probe is then not a lower bound
CACHE_RESIDENT_FACTOR = 2
POLYAK_KERNELS = ("reference", "foreach", "fused", "triton")

# ---------------------------------------------------------------- models


def _tree_from_shapes(
    shapes: list[tuple[str, tuple[int, ...]]], device: str, dtype: torch.dtype
) -> nn.Module:
    """An ``nn.Module`` whose parameters are exactly ``shapes`` (dotted names make submodules)."""
    root = nn.Module()
    for name, shape in shapes:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        t = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02)
        mod.register_parameter(leaf, nn.Parameter(t))
    return root


def transformer_shapes(d: int, layers: int = 24, vocab: int = 50304) -> list:
    """GPT-style decoder: tied embedding + per layer LN, qkv, proj, LN, fc, fc-out (w and b)."""
    shapes: list = [("wte.weight", (vocab, d))]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)),
            (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (3 * d, d)),
            (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)),
            (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)),
            (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)),
            (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)),
            (p + "mlp.c_proj.bias", (d,)),
        ]
    return shapes


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5: stride on the 3x3), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNet50(nn.Module):
    """torchvision ``resnet50()`` rebuilt by hand: same names, parameter and buffer shapes."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(inplanes, planes, stride if b == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            self.add_module(f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ViT(nn.Module):
    """ViT (timm's ``vit_base_patch16_224`` layout) from ``nn.TransformerEncoderLayer`` blocks."""

    def __init__(
        self,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp: int = 3072,
        patch: int = 16,
        img: int = 224,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim).normal_(0.0, 1e-6))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim).normal_(0.0, 0.02))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                mlp,
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=1e-6,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def _count(model: nn.Module) -> tuple[int, int]:
    ps = list(model.parameters())
    return len(ps), sum(p.numel() for p in ps)


def _check_count(what: str, model: nn.Module, tensors: int, params: int) -> None:
    got = _count(model)
    if got != (tensors, params):
        raise RuntimeError(
            f"{what}: built {got[0]} parameter tensors / {got[1]:,} parameters, "
            f"expected {tensors} / {params:,}; the hand-built model drifted from the reference."
        )


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model to average and the policy every implementation is configured for."""

    name: str
    arch: str
    model: nn.Module
    buffers: bool  # track buffers: floating ones averaged, integer ones copied
    shadow_dtype: torch.dtype
    full_size: bool
    avg: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    copy: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.avg = [(n, p) for n, p in self.model.named_parameters() if p.is_floating_point()]
        if self.buffers:
            bufs = list(self.model.named_buffers())
            self.avg += [(n, b) for n, b in bufs if b.is_floating_point()]
            self.copy = [(n, b) for n, b in bufs if not b.is_floating_point()]

    @property
    def param_dtype(self) -> torch.dtype:
        return self.avg[0][1].dtype

    @property
    def device(self) -> torch.device:
        return self.avg[0][1].device

    def bytes_per_update(self, shadow_dtype: torch.dtype) -> int:
        """Bytes read + written by one ideal update: read weight, read + write shadow; copies r+w."""
        s = torch.empty((), dtype=shadow_dtype).element_size()
        total = sum(t.numel() * (t.element_size() + 2 * s) for _, t in self.avg)
        return total + sum(2 * t.numel() * t.element_size() for _, t in self.copy)

    def working_set_bytes(self, shadow_dtype: torch.dtype) -> int:
        """Distinct bytes one update touches: each weight and its shadow; each copy's ends."""
        s = torch.empty((), dtype=shadow_dtype).element_size()
        total = sum(t.numel() * (t.element_size() + s) for _, t in self.avg)
        return total + sum(2 * t.numel() * t.element_size() for _, t in self.copy)

    def summary(self) -> dict[str, Any]:
        params = list(self.model.parameters())
        bufs = list(self.model.buffers())
        return {
            "name": self.name,
            "arch": self.arch,
            "full_size": self.full_size,
            "param_dtype": _short(self.param_dtype),
            "shadow_dtype": _short(self.shadow_dtype),
            "param_tensors": len(params),
            "param_elements": sum(p.numel() for p in params),
            "buffer_tensors": len(bufs),
            "buffer_elements": sum(b.numel() for b in bufs),
            "tracks_buffers": self.buffers,
            "tracked_tensors": len(self.avg) + len(self.copy),
            "tracked_elements": sum(t.numel() for _, t in self.avg + self.copy),
            "bytes_per_update": self.bytes_per_update(self.shadow_dtype),
            "working_set_bytes": self.working_set_bytes(self.shadow_dtype),
        }


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


def build_transformer(device: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    full = device == "cuda"
    d = 2048 if full else 256
    model = _tree_from_shapes(transformer_shapes(d), device, dtype)
    n, p = _count(model)
    arch = f"GPT-style decoder, 24 layers, d={d}, vocab 50304, tied embedding: {n} tensors, {p:,} params"
    if full:
        _check_count("transformer", model, 289, 1_311_621_120)
    else:
        arch += " (CPU scale of the 1.31B / 289-tensor model)"
    return model, arch


def wl_transformer(device: str) -> Workload:
    model, arch = build_transformer(device)
    return Workload("transformer", arch, model, False, torch.float32, device == "cuda")


def _resnet(device: str) -> ResNet50:
    model = ResNet50()
    _check_count("ResNet-50", model, 161, 25_557_032)
    return model.to(device)


def wl_resnet50(device: str) -> Workload:
    arch = (
        "ResNet-50 (torchvision shapes): 161 param tensors, 25,557,032 params; buffers not tracked"
    )
    return Workload("resnet50", arch, _resnet(device), False, torch.float32, True)


def wl_resnet50_buffers(device: str) -> Workload:
    arch = (
        "ResNet-50 (torchvision shapes): 161 params + 106 float buffers averaged "
        "+ 53 num_batches_tracked copied = 320 tensors"
    )
    return Workload("resnet50_buffers", arch, _resnet(device), True, torch.float32, True)


def _bf16_model(device: str) -> tuple[nn.Module, str, bool]:
    if device == "cuda":
        model, arch = build_transformer(device, torch.bfloat16)
        return model, arch, True
    shapes = [(f"layers.{i}.weight", (1024, 512)) for i in range(48)]
    model = _tree_from_shapes(shapes, device, torch.bfloat16)
    return model, "48 tensors of 1024x512 = 25,165,824 params (CPU scale of 1.31B)", False


def wl_bf16(device: str) -> Workload:
    model, arch, full = _bf16_model(device)
    arch = f"bf16 params, fp32 shadows: {arch}"
    return Workload("bf16", arch, model, False, torch.float32, full)


def wl_bf16_native(device: str) -> Workload:
    model, arch, full = _bf16_model(device)
    arch = f"bf16 params, bf16 shadows (the peers' default; timm V3 rounds stochastically): {arch}"
    return Workload("bf16_native", arch, model, False, torch.bfloat16, full)


def build_vit(device: str) -> tuple[nn.Module, str]:
    if device == "cuda":
        model = ViT()
        _check_count("ViT-B/16", model, 152, 86_567_656)
        arch = "ViT-B/16 (nn.TransformerEncoderLayer blocks): 152 tensors, 86,567,656 params"
    else:
        model = ViT(dim=384, heads=6, mlp=1536)
        n, p = _count(model)
        arch = (
            f"ViT-B/16 layout at width 384 (ViT-S/16 widths): {n} tensors, {p:,} params (CPU scale)"
        )
    return model.to(device), arch


def wl_vit_b16(device: str) -> Workload:
    model, arch = build_vit(device)
    return Workload("vit_b16", arch, model, False, torch.float32, device == "cuda")


def wl_many_tiny(device: str) -> Workload:
    model = nn.ModuleList(nn.Linear(64, 64) for _ in range(1024)).to(device)
    n, p = _count(model)
    arch = f"1024 x Linear(64, 64): {n} tensors, {p:,} params"
    return Workload("many_tiny", arch, model, False, torch.float32, True)


WORKLOADS: dict[str, Callable[[str], Workload]] = {
    "transformer": wl_transformer,
    "resnet50": wl_resnet50,
    "resnet50_buffers": wl_resnet50_buffers,
    "bf16": wl_bf16,
    "bf16_native": wl_bf16_native,
    "vit_b16": wl_vit_b16,
    "many_tiny": wl_many_tiny,
}


# ---------------------------------------------------------------- implementations


class Unavailable(Exception):
    """The implementation cannot run here; the message says why."""


@dataclass
class Impl:
    impl: str
    kernel: str
    update: Callable[[], Any]
    shadow_of: Callable[[str], torch.Tensor | None]
    note: str = ""
    keep: Any = None  # keeps the EMA object alive
    inner: int = 1
    first_update_s: float = 0.0  # wall time of the first update (compiled kernels compile there)


def _any(wl: Workload) -> bool:
    return True


@dataclass
class Spec:
    impl: str
    kernel: str
    make: Callable[[Workload], Impl]
    applies: Callable[[Workload], bool] = _any  # no row at all where it does not apply

    @property
    def key(self) -> str:
        return f"{self.impl}:{self.kernel}"


def _mixed(wl: Workload) -> bool:
    return wl.shadow_dtype != wl.param_dtype


def _module_shadows(module: nn.Module) -> Callable[[str], torch.Tensor | None]:
    table = dict(module.named_parameters())
    table.update(module.named_buffers())
    return table.get


def make_polyak(
    kernel: str, label: str | None = None, pairs: bool = False, **options: Any
) -> Callable:
    """``polyak.EMA(model, kernel=kernel, **options)``; ``label`` names the row's kernel.

    ``pairs``: built on the workload's ``(name, tensor)`` pairs instead of the model, the tensors
    fixed at construction (as torch_ema keeps them), so with no per-update check that the model
    still holds them (``polyak._tracking``): what that check costs is such a row against the
    model's row of the same kernel. Pairs can only average: no integer buffers to copy.
    """

    def make(wl: Workload) -> Impl:
        try:
            import polyak
        except ImportError as e:
            raise Unavailable(f"import polyak failed ({e}); run with PYTHONPATH=src") from e
        kw = dict(options)
        if pairs:
            tracked: Any = list(wl.avg) + list(wl.copy)
        else:
            tracked = wl.model
            kw["buffers"] = "average" if wl.buffers else "none"
        ema = polyak.EMA(tracked, decay=DECAY, shadow_dtype=wl.shadow_dtype, kernel=kernel, **kw)
        chosen = getattr(ema, "kernel", kernel)
        notes = ["(name, tensor) pairs"] if pairs else []
        notes += [f"{k}={v!r}" for k, v in options.items()]
        if chosen != kernel:
            notes.append(f"kernel={kernel!r} ran as {chosen!r}")
        return Impl("polyak", label or kernel, ema.update, ema.average, ", ".join(notes), ema)

    return make


def make_raw(wl: Workload, live: bool = False, label: str | None = None) -> Impl:
    """``_foreach_lerp_`` on detached aliases of the weights (``live``: on the nn.Parameters).

    The detached form is the floor of a multi-tensor update; the live form is what any EMA that
    reads the model's parameters each step pays, as an nn.Parameter costs a foreach op ~0.4 µs
    more to parse than a plain tensor (0.8 ms per update with 2,048 tensors on the CPU).
    """
    names = [n for n, _ in wl.avg]
    params = [t if live else t.detach() for _, t in wl.avg]
    shadows = [t.detach().to(wl.shadow_dtype, copy=True) for t in params]
    csrc = [t.detach() for _, t in wl.copy]
    cdst = [t.clone() for t in csrc]
    w = 1.0 - DECAY
    if _mixed(wl):
        sd = wl.shadow_dtype

        def lerp() -> None:  # the naive upcast: a full fp32 copy of the weights per update
            torch._foreach_lerp_(shadows, [p.to(sd) for p in params], w)

        note = "naive upcast: _foreach_lerp_(shadows, [p.float() for p in params], w)"
    else:

        def lerp() -> None:
            torch._foreach_lerp_(shadows, params, w)

        note = "_foreach_lerp_(shadows, params, w)"
    if cdst:

        def update() -> None:
            lerp()
            torch._foreach_copy_(cdst, csrc)

        note += " + _foreach_copy_ of integer buffers"
    else:
        update = lerp
    if live:  # under no_grad, as an EMA runs it: no autograd graph through the Parameters
        planned = update

        def update() -> None:
            with torch.no_grad():
                planned()

        note = note.replace("params, w", "live nn.Parameters, w")
    table = dict(zip(names, shadows, strict=True))
    table |= dict(zip([n for n, _ in wl.copy], cdst, strict=True))
    kernel = label or (RAW_LIVE if live else "foreach")
    return Impl(RAW, kernel, update, table.get, note, (shadows, cdst))


# bytes of the raw chunked row's fp32 scratch (--raw-chunk-mib; None: a quarter of the device's
# last-level cache, 1 to 64 MiB), so a chunk is still in cache when the lerp reads it back
_RAW_CHUNK: dict[str, int | None] = {"bytes": None}


def raw_chunk_elements(device: torch.device, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in the raw chunked row's scratch on ``device``."""
    nbytes = _RAW_CHUNK["bytes"]
    if nbytes is None:
        cache = cache_bytes(device) or (32 << 20)
        nbytes = min(64 << 20, max(1 << 20, cache // 4))
    return max(1, nbytes // dtype.itemsize)


def make_raw_chunked(wl: Workload) -> Impl:
    """bf16 weights into fp32 shadows with no per-update allocation: the weights are upcast a
    chunk at a time into one persistent fp32 scratch (``_foreach_copy_``), then
    ``_foreach_lerp_(shadows, scratch views, w)``; a weight larger than a chunk is cut into
    slices. The plan (which slices go through which part of the scratch) is built once here.

    Bytes from memory per element: read the weight (2) and the shadow (4), write the shadow (4),
    the scratch staying in cache: the same 10 B floor as a fused upcast.
    """
    sd = wl.shadow_dtype
    chunk = raw_chunk_elements(wl.device, sd)
    params = [t.detach() for _, t in wl.avg]
    shadows = [t.to(sd, copy=True) for t in params]
    scratch = torch.empty(chunk, dtype=sd, device=wl.device)
    groups: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []
    src: list[torch.Tensor] = []
    dst: list[torch.Tensor] = []
    views: list[torch.Tensor] = []
    used = 0
    for p, s in zip(params, shadows, strict=True):
        flat_p, flat_s = p.view(-1), s.view(-1)
        for start in range(0, flat_p.numel(), chunk):
            n = min(chunk, flat_p.numel() - start)
            if used + n > chunk:
                groups.append((src, dst, views))
                src, dst, views, used = [], [], [], 0
            src.append(flat_p[start : start + n])
            dst.append(flat_s[start : start + n])
            views.append(scratch[used : used + n])
            used += n
    if src:
        groups.append((src, dst, views))
    w = 1.0 - DECAY

    def update() -> None:
        for g_src, g_dst, g_views in groups:
            torch._foreach_copy_(g_views, g_src)
            torch._foreach_lerp_(g_dst, g_views, w)

    table = dict(zip([n for n, _ in wl.avg], shadows, strict=True))
    mib = chunk * sd.itemsize / 2**20
    note = (
        f"_foreach_copy_ into a persistent {mib:g} MiB {_short(sd)} scratch, then "
        f"_foreach_lerp_(shadows, scratch, w): {len(groups)} chunks"
    )
    return Impl(RAW, RAW_CHUNKED, update, table.get, note, (shadows, scratch, groups))


def make_torch_ema(wl: Workload) -> Impl:
    try:
        from torch_ema import ExponentialMovingAverage
    except ImportError as e:
        raise Unavailable(f"torch_ema not installed ({e}): pip install torch-ema") from e
    # torch_ema's arithmetic cannot average integer buffers: hand it the floating tensors only;
    # use_num_updates=False: its default warms the decay up as min(d, (1 + n) / (10 + n))
    ema = ExponentialMovingAverage([t for _, t in wl.avg], decay=DECAY, use_num_updates=False)
    note = "use_num_updates=False"
    if _mixed(wl):
        ema.shadow_params = [s.to(wl.shadow_dtype) for s in ema.shadow_params]
        note += "; shadows cast to fp32 after construction (it clones in the weights' dtype)"
    table = dict(zip([n for n, _ in wl.avg], ema.shadow_params, strict=True))
    return Impl("torch_ema", "loop", ema.update, table.get, note, ema)


def make_ema_pytorch(foreach: bool) -> Callable[[Workload], Impl]:
    def make(wl: Workload) -> Impl:
        try:
            from ema_pytorch import EMA
        except ImportError as e:
            raise Unavailable(f"ema_pytorch not installed ({e}): pip install ema-pytorch") from e
        # its decay is clamp(1 - (1 + t / inv_gamma) ** -power, min_value, beta) for step t > 0:
        # min_value=beta makes it the constant beta from its second update on (the first copies)
        kw: dict[str, Any] = dict(
            beta=DECAY,
            min_value=DECAY,
            update_after_step=0,
            update_every=1,
            use_foreach=foreach,
            include_online_model=False,
        )
        note = "min_value=beta (constant decay), update_after_step=0, update_every=1"
        if not wl.buffers:
            kw["ignore_names"] = {n for n, _ in wl.model.named_buffers()}
            if kw["ignore_names"]:
                note += ", buffers in ignore_names"
        if _mixed(wl):
            kw["ema_model"] = copy.deepcopy(wl.model).to(wl.shadow_dtype)
            kw["coerce_dtype"] = True
            note += ", fp32 ema_model + coerce_dtype=True"
        ema = EMA(wl.model, **kw)
        return Impl(
            "ema_pytorch",
            "foreach" if foreach else "loop",
            ema.update,
            _module_shadows(ema.ema_model),
            note,
            ema,
        )

    return make


_TIMM: dict[str, Any] = {}


def load_timm_model_ema(path: str | None = None) -> Any:
    """timm's ``utils/model_ema.py`` loaded by file path: timm itself is never imported.

    ``importlib.util.find_spec("timm")`` locates the installed package without running its
    ``__init__`` (which would import torchvision); the file itself imports only torch and the
    standard library (timm 1.0.x), so no stubs are needed.
    """
    if "module" in _TIMM:
        return _TIMM["module"]
    if "error" in _TIMM:
        raise Unavailable(_TIMM["error"])
    try:
        if path is None:
            spec = importlib.util.find_spec("timm")
            if spec is None or not spec.submodule_search_locations:
                raise Unavailable(
                    "timm not installed: pip install --no-deps timm (or pass --timm-file)"
                )
            file = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
        else:
            file = Path(path)
        if not file.is_file():
            raise Unavailable(f"timm EMA file not found at {file}")
        mspec = importlib.util.spec_from_file_location("_bench_timm_model_ema", file)
        assert mspec is not None and mspec.loader is not None
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[mspec.name] = mod
        try:
            mspec.loader.exec_module(mod)
        except ImportError as e:
            raise Unavailable(f"{file} imports something not available here: {e}") from e
        _TIMM["module"] = mod
        _TIMM["info"] = {
            "loaded_from": str(file),
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
            "timm_imported": "timm" in sys.modules,
        }
        return mod
    except Unavailable as e:
        _TIMM["error"] = str(e)
        raise


def make_timm_v2(wl: Workload) -> Impl:
    mod = load_timm_model_ema(_TIMM.get("path"))
    ema = mod.ModelEmaV2(wl.model, decay=DECAY)
    note = "whole state_dict (it cannot leave buffers out)"
    if _mixed(wl):
        ema.module.to(wl.shadow_dtype)
        note += "; module cast to fp32 after construction"
    return Impl(
        "timm_v2", "loop", lambda: ema.update(wl.model), _module_shadows(ema.module), note, ema
    )


def make_timm_v3(wl: Workload) -> Impl:
    mod = load_timm_model_ema(_TIMM.get("path"))
    # use_warmup=False (its default): a constant decay from step 2 on (step 1 copies)
    kw: dict[str, Any] = dict(
        decay=DECAY, use_warmup=False, foreach=True, exclude_buffers=not wl.buffers
    )
    kernel = "foreach"
    note = "use_warmup=False, update(model, step=n)"
    if _mixed(wl):
        kw["dtype"] = wl.shadow_dtype
        note += ", dtype=float32"
    elif wl.param_dtype == torch.bfloat16:
        kernel = "foreach+SR"
        note += ", bf16 shadows with stochastic rounding (its default)"
    if not wl.buffers and any(True for _ in wl.model.buffers()):
        note += ", exclude_buffers=True (buffers copied)"
    ema = mod.ModelEmaV3(wl.model, **kw)
    step = [0]

    def update() -> None:
        step[0] += 1
        ema.update(wl.model, step=step[0])

    return Impl("timm_v3", kernel, update, _module_shadows(ema.module), note, ema)


def make_swa(wl: Workload) -> Impl:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    am = AveragedModel(wl.model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=wl.buffers)
    note = f"multi_avg_fn=get_ema_multi_avg_fn({DECAY}), use_buffers={wl.buffers}"
    if _mixed(wl):
        am.module.to(wl.shadow_dtype)
        note += "; module cast to fp32"
    return Impl(
        "swa_averaged_model",
        "foreach",
        lambda: am.update_parameters(wl.model),
        _module_shadows(am.module),
        note,
        am,
    )


def _bf16_shadows(wl: Workload) -> bool:
    return wl.shadow_dtype == torch.bfloat16


# where polyak's torch.compile kernels run on the CPU (--cpu-fused); on CUDA they run everywhere
_CPU_FUSED = {"policy": "bf16"}


def _fused_here(wl: Workload) -> bool:
    if wl.device.type != "cpu":
        return True
    policy = _CPU_FUSED["policy"]
    return policy == "all" or (policy == "bf16" and wl.param_dtype == torch.bfloat16)


def _triton_here(wl: Workload) -> bool:
    """The hand-written Triton kernel runs on CUDA only (the CPU interpreter is for tests)."""
    import importlib.util

    return wl.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _kernel_applies(kernel: str) -> Callable[[Workload], bool]:
    return {"fused": _fused_here, "triton": _triton_here}.get(kernel, _any)


# ---------------------------------------------------------------- polyak.compat drop-ins
#
# The shims run on polyak.EMA; their rows are timed in the same rounds as polyak's, and their
# target is the ratio to the polyak row with the same kernel (what a user pays for keeping the
# old class's API). Each is configured as its peer row is (constant DECAY, warm-ups off) and,
# where the class can say so, to the workload's set of tensors; where it cannot (timm averages
# or copies every buffer; ema-pytorch and timm V2 have no bf16-shadow option), it has no row.
SHIM = "compat_"
SHIM_TARGET = "polyak.compat drop-in <= 1.05x polyak.EMA (same kernel)"
# ours, not the issue's: the spread of two identical raw rows (placement), what following the
# model costs (polyak on the model against polyak on fixed (name, tensor) pairs), and the update
# itself without that check against the raw op on the same live tensors
CONTROL_TARGET = "control: a second raw _foreach_lerp_ row (own shadows) <= 1.05x the first"
WATCH_TARGET = "following the model: polyak on the model <= 1.05x polyak on (name, tensor) pairs"
PAIRS_TARGET = "polyak on (name, tensor) pairs <= 1.05x raw _foreach_lerp_ on the live tensors"


def _engine_kernel(ema: Any) -> str:
    """The label of the polyak row a shim's EMA runs like: its kernel, ``+SR`` if stochastic."""
    return ema.kernel + ("+SR" if getattr(ema, "rounding", "nearest") == "stochastic" else "")


def _buffers_expressible(wl: Workload) -> bool:
    """timm's classes always handle buffers: they match a workload that tracks them, or a
    model that has none."""
    return wl.buffers or not any(True for _ in wl.model.buffers())


def _import_compat(module: str) -> Any:
    try:
        return importlib.import_module(f"polyak.compat.{module}")
    except ImportError as e:
        raise Unavailable(
            f"import polyak.compat.{module} failed ({e}); run with PYTHONPATH=src"
        ) from e


def make_compat_torch_ema(wl: Workload) -> Impl:
    """``polyak.compat.torch_ema.ExponentialMovingAverage`` of the workload's tensors (integer
    ones included: the shim copies them), ``use_num_updates=False``; bf16 shadows by
    ``.to(dtype=torch.bfloat16)`` (the shim's default for bf16 weights is fp32)."""
    mod = _import_compat("torch_ema")
    named = wl.avg + wl.copy
    ema = mod.ExponentialMovingAverage([t for _, t in named], decay=DECAY, use_num_updates=False)
    note = "use_num_updates=False"
    if wl.shadow_dtype == torch.bfloat16:
        ema.to(dtype=torch.bfloat16)
        note += ", .to(dtype=torch.bfloat16)"
    engine = ema._ema
    index = {n: str(i) for i, (n, _) in enumerate(named)}

    def shadow_of(name: str) -> torch.Tensor | None:
        return engine.average(index[name]) if name in index else None

    return Impl(SHIM + "torch_ema", _engine_kernel(engine), ema.update, shadow_of, note, ema)


def make_compat_timm_v2(wl: Workload) -> Impl:
    mod = _import_compat("timm")
    ema = mod.ModelEmaV2(wl.model, decay=DECAY)
    engine = ema._mirror.ema
    return Impl(
        SHIM + "timm_v2",
        _engine_kernel(engine),
        lambda: ema.update(wl.model),
        engine.average,
        "update(model)",
        ema,
    )


def make_compat_timm_v3(wl: Workload) -> Impl:
    mod = _import_compat("timm")
    kw: dict[str, Any] = dict(decay=DECAY, use_warmup=False)
    note = "use_warmup=False, update(model, step=n)"
    if _mixed(wl):  # its default for a bf16 model is bf16 averages
        kw["dtype"] = wl.shadow_dtype
        note += ", dtype=float32"
    elif wl.param_dtype == torch.bfloat16:
        note += ", bf16 shadows with stochastic rounding (its default)"
    ema = mod.ModelEmaV3(wl.model, **kw)
    engine = ema._mirror.ema
    step = [0]

    def update() -> None:
        step[0] += 1
        ema.update(wl.model, step=step[0])

    return Impl(SHIM + "timm_v3", _engine_kernel(engine), update, engine.average, note, ema)


def make_compat_ema_pytorch(wl: Workload) -> Impl:
    mod = _import_compat("ema_pytorch")
    kw: dict[str, Any] = dict(
        beta=DECAY,
        min_value=DECAY,
        update_after_step=0,
        update_every=1,
        include_online_model=False,
    )
    note = "min_value=beta (constant decay), update_after_step=0, update_every=1"
    if not wl.buffers:
        kw["ignore_names"] = {n for n, _ in wl.model.named_buffers()}
        if kw["ignore_names"]:
            note += ", buffers in ignore_names"
    ema = mod.EMA(wl.model, **kw)
    engine = ema._mirror.ema
    return Impl(SHIM + "ema_pytorch", _engine_kernel(engine), ema.update, engine.average, note, ema)


def _round_to_nearest_shadows(wl: Workload) -> bool:
    return not _bf16_shadows(wl)


def _timm_v3_applies(wl: Workload) -> bool:
    # bf16 shadows: stochastic rounding (timm's default), a polyak fused+SR kernel
    return _buffers_expressible(wl) and (not _bf16_shadows(wl) or _fused_here(wl))


COMPAT_SPECS: list[Spec] = [
    Spec(SHIM + "torch_ema", "auto", make_compat_torch_ema),
    Spec(
        SHIM + "timm_v2",
        "auto",
        make_compat_timm_v2,
        lambda wl: _buffers_expressible(wl) and _round_to_nearest_shadows(wl),
    ),
    Spec(SHIM + "timm_v3", "auto", make_compat_timm_v3, _timm_v3_applies),
    Spec(SHIM + "ema_pytorch", "auto", make_compat_ema_pytorch, _round_to_nearest_shadows),
]


SPECS: list[Spec] = [
    *(Spec("polyak", k, make_polyak(k), _kernel_applies(k)) for k in POLYAK_KERNELS),
    # bf16 shadows rounded stochastically: the counterpart of timm V3's default
    Spec(
        "polyak",
        "fused+SR",
        make_polyak("fused", "fused+SR", rounding="stochastic"),
        lambda wl: _bf16_shadows(wl) and _fused_here(wl),
    ),
    Spec(
        "polyak",
        "triton+SR",
        make_polyak("triton", "triton+SR", rounding="stochastic"),
        lambda wl: _bf16_shadows(wl) and _triton_here(wl),
    ),
    Spec(RAW, "foreach", make_raw),
    Spec(RAW, RAW_CHUNKED, make_raw_chunked, _mixed),
    Spec("torch_ema", "loop", make_torch_ema),
    Spec("ema_pytorch", "loop", make_ema_pytorch(False)),
    Spec("ema_pytorch", "foreach", make_ema_pytorch(True)),
    Spec("timm_v2", "loop", make_timm_v2),
    Spec("timm_v3", "foreach", make_timm_v3),
    Spec("swa_averaged_model", "foreach", make_swa),
    *COMPAT_SPECS,
    # last: on a GPU whose memory runs short (the 1.31B model), these are dropped, not a peer
    Spec(RAW, RAW_LIVE, lambda wl: make_raw(wl, live=True), lambda wl: not _mixed(wl)),
    # pairs can only average: a workload that copies integer buffers has no pairs row
    Spec(
        "polyak",
        "foreach" + PAIRS,
        make_polyak("foreach", "foreach" + PAIRS, pairs=True),
        lambda wl: not wl.copy,
    ),
    Spec(RAW, RAW_REPLICA, lambda wl: make_raw(wl, label=RAW_REPLICA), lambda wl: not _mixed(wl)),
]


# the training step also runs polyak's update on a side CUDA stream (overlapping the next forward)
TRAIN_EXTRA_SPECS: list[Spec] = [
    Spec("polyak", f"{k}+side", make_polyak(k, f"{k}+side", stream="side"), _kernel_applies(k))
    for k in ("foreach", "fused", "triton")
]


def polyak_auto_kernel(wl: Workload) -> str | None:
    """What ``kernel="auto"`` picks for this workload's device and dtypes (a 1-element stand-in)."""
    try:
        import polyak

        t = torch.zeros(1, device=wl.device, dtype=wl.param_dtype)
        return polyak.EMA([("w", t)], shadow_dtype=wl.shadow_dtype, kernel="auto").kernel
    except Exception as e:
        return f"unknown ({type(e).__name__}: {e})"


def is_peer(impl: str) -> bool:
    """Another library's EMA: not polyak, not the raw op, not one of polyak's drop-ins."""
    return impl not in ("polyak", RAW) and not impl.startswith(SHIM)


# ---------------------------------------------------------------- tracking check


def _tensor_kinds(wl: Workload) -> list[tuple[str, str, torch.Tensor]]:
    out = [("param", n, p) for n, p in wl.model.named_parameters()]
    for n, b in wl.model.named_buffers():
        out.append(("fbuf" if b.is_floating_point() else "ibuf", n, b))
    return out


def _sum64(t: torch.Tensor) -> float:
    return float(t.detach().sum(dtype=torch.float64))


@torch.no_grad()
def observe_tracking(wl: Workload, impls: list[Impl]) -> dict[int, dict[str, Any]]:
    """Nudge every tensor of the model, update each implementation once, see what moved.

    Floating tensors get ``+delta``, integer buffers ``+1``; afterwards the model is nudged back
    (the values do not matter to the timing, only that nothing is denormal). A shadow whose mean
    moved by the whole nudge was copied, by part of it averaged, by nothing not updated.
    """
    kinds = _tensor_kinds(wl)
    delta = 1.0 if wl.param_dtype == torch.float32 else 8.0  # bf16 shadows must see a move
    before: dict[int, dict[str, float | None]] = {}
    for impl in impls:
        before[id(impl)] = {}
        for _, n, _t in kinds:
            s = impl.shadow_of(n)
            before[id(impl)][n] = None if s is None else _sum64(s)
    for _, _, t in kinds:
        t.add_(delta if t.is_floating_point() else 1)
    try:
        for impl in impls:
            impl.update()
        sync(wl.device)
    finally:
        for _, _, t in kinds:
            t.sub_(delta if t.is_floating_point() else 1)
    result: dict[int, dict[str, Any]] = {}
    for impl in impls:
        counts: dict[tuple[str, str], int] = {}
        states: dict[str, str] = {}
        n_tensors = n_elements = 0
        dtypes: set[torch.dtype] = set()
        for kind, n, t in kinds:
            s = impl.shadow_of(n)
            b = before[id(impl)][n]
            if s is None or b is None:
                state = "untracked"
            else:
                nudge = delta if t.is_floating_point() else 1
                moved = (_sum64(s) - b) / (t.numel() * nudge)
                if moved > 0.999:
                    state = "copied"
                elif moved > 1e-7:
                    state = "averaged"
                else:
                    state = "not updated"
            states[n] = state
            if state in ("averaged", "copied"):
                n_tensors += 1
                n_elements += t.numel()
                if state == "averaged" and kind == "param":
                    dtypes.add(s.dtype)
            counts[(kind, state)] = counts.get((kind, state), 0) + 1
        result[id(impl)] = {
            "tracked": _describe(counts),
            "n_tensors": n_tensors,
            "n_elements": n_elements,
            "shadow_dtype": dtypes.pop() if len(dtypes) == 1 else None,
            "states": states,
        }
    return result


def compare_tracked_set(wl: Workload, states: dict[str, str]) -> tuple[bool, str]:
    """Does an implementation track the workload's set: its averaged tensors averaged, its
    copied (integer) tensors copied, and nothing else updated? ``(same, what differs)``.

    ``states`` maps each model tensor's name to what :func:`observe_tracking` saw (averaged,
    copied, not updated, untracked); a tensor outside the workload's set that is left alone
    (not updated or untracked) counts as not tracked.
    """
    want = {n: "averaged" for n, _ in wl.avg} | {n: "copied" for n, _ in wl.copy}
    kinds = {n: kind for kind, n, _ in _tensor_kinds(wl)}
    words = {"param": "params", "fbuf": "float bufs", "ibuf": "int bufs"}
    diffs: dict[tuple[str, str, str], int] = {}
    for name, got in states.items():
        expected = want.get(name, "not tracked")
        if got in ("not updated", "untracked"):
            got = "not tracked"
        if got != expected:
            key = (words[kinds[name]], got, expected)
            diffs[key] = diffs.get(key, 0) + 1
    if not diffs:
        return True, ""
    return False, "; ".join(
        f"{c} {kind} {got} (workload: {expected})" for (kind, got, expected), c in diffs.items()
    )


def value_tolerance(
    s0_absmax: float, p_absmax: float, w: float, steps: int, dtype: torch.dtype
) -> float:
    """Largest error an exact-decay lerp in ``dtype`` can have after ``steps`` updates.

    One update computes ``s + w (p - s)`` (or ``d s + w p``, or ``s - w (s - p)``) with at most
    three roundings to ``dtype``, each off by at most half an ulp (stochastic rounding: one ulp)
    of a value no larger than ``|s| + w (|p| + |s|)``, and ``ulp(x) <= eps |x|``: at most
    ``2 eps (S + w (P + S))`` per update, with ``P = max|p|`` and ``S`` bounding every ``|s|``
    on the way (``s`` moves from ``s0`` towards ``p`` by ``1 - d**steps`` of the distance, so
    ``S = |s0| + (1 - d**steps)(|s0| + P)``). Plus the decay itself held in fp32 (ATen's opmath
    for a Python-float weight; ema-pytorch computes its decay as an fp32 tensor): ``1 - decay``
    off by up to ``2**-24`` moves ``s`` by up to ``2**-24 (P + S)``. An earlier update's error
    shrinks by ``d < 1``, so ``steps`` updates add up to at most ``steps`` times the sum, plus
    the smallest normal number per update for values near zero. The maxima are per tensor.
    """
    info = torch.finfo(dtype)
    c = 1.0 - (1.0 - w) ** steps
    most = s0_absmax + c * (s0_absmax + p_absmax)
    spread = p_absmax + most
    return steps * (2 * info.eps * (most + w * spread) + 2.0**-24 * spread + info.tiny)


def max_abs_error(s: torch.Tensor, s0: torch.Tensor, p: torch.Tensor, c: float) -> float:
    """``max |s - r|`` in float64 with ``r = s0 + c (p - s0)``, a slice at a time (small float64
    temporaries, reused from the cache); ``inf`` when anything is NaN."""
    fs, f0, fp = s.detach().reshape(-1), s0.reshape(-1), p.detach().reshape(-1)
    step = 1 << (24 if s.device.type == "cuda" else 18)
    worst = torch.zeros((), dtype=torch.float64, device=s.device)
    for i in range(0, fs.numel(), step):
        ref = f0[i : i + step].double()
        ref.add_(fp[i : i + step].double() - ref, alpha=c)
        worst = torch.maximum(worst, ref.sub_(fs[i : i + step].double()).abs_().max())
    return float(torch.nan_to_num(worst, nan=math.inf))


@torch.no_grad()
def verify_values(
    wl: Workload, impls: list[Impl], steps: int = VERIFY_STEPS
) -> dict[int, dict[str, Any]]:
    """Check each implementation's arithmetic against a float64 lerp of its own shadows.

    The model is moved once: every averaged tensor by ``+VERIFY_SHIFT``, every copied (integer)
    tensor by ``+7``; then, for each implementation, its shadows ``s0`` are read, it updates
    ``steps`` times, and each shadow must match the float64 reference of ``steps`` lerps at
    the constant ``DECAY``, ``r = s0 + (1 - DECAY**steps) (p - s0)``, to within
    :func:`value_tolerance`; each copy must equal the model's tensor exactly. A shift of 64
    moves a shadow by about 0.064 per update, far more than a bf16 ulp of it, so a different
    decay shows: ``1 - decay`` off by 6% of itself fails in bf16, by 1e-4 of itself in fp32.
    Run last: the model stays shifted.

    Returns, per implementation (by ``id``): ``ok``, ``steps``, ``max_err_over_tol`` (the
    worst ``max|s - r| / tol`` of a tensor), ``worst`` (that tensor), ``missing`` (averaged
    or copied tensors without a shadow), ``copies_wrong`` and ``error`` (an update raised).
    """
    w = 1.0 - DECAY
    c = 1.0 - DECAY**steps
    for _, t in wl.avg:
        t.add_(VERIFY_SHIFT)
    for _, t in wl.copy:
        t.add_(7)
    sync(wl.device)
    p_absmax = {n: float(t.detach().abs().max()) for n, t in wl.avg}
    # one snapshot buffer per shadow dtype, reused by every implementation
    total = sum(t.numel() for _, t in wl.avg)
    snaps: dict[torch.dtype, torch.Tensor] = {}
    out: dict[int, dict[str, Any]] = {}
    for impl in impls:
        res: dict[str, Any] = {
            "ok": False,
            "steps": steps,
            "max_err_over_tol": None,
            "worst": None,
            "missing": [],
            "copies_wrong": [],
            "error": None,
        }
        out[id(impl)] = res
        try:
            before: dict[str, torch.Tensor | None] = {}
            offset = 0
            for n, t in wl.avg:
                s = impl.shadow_of(n)
                before[n] = None
                if s is not None:
                    if s.dtype not in snaps:
                        snaps[s.dtype] = torch.empty(total, dtype=s.dtype, device=wl.device)
                    view = snaps[s.dtype][offset : offset + s.numel()].view(s.shape)
                    before[n] = view.copy_(s.detach())
                offset += t.numel()
            for _ in range(steps):
                impl.update()
            sync(wl.device)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            continue
        worst, worst_name = -1.0, None
        for n, p in wl.avg:
            s, s0 = impl.shadow_of(n), before.pop(n)
            if s is None or s0 is None or s.shape != p.shape:
                res["missing"].append(n)
                continue
            err = max_abs_error(s, s0, p, c)
            tol = value_tolerance(float(s0.abs().max()), p_absmax[n], w, steps, s.dtype)
            if err / tol > worst:
                worst, worst_name = err / tol, n
        for n, p in wl.copy:
            s = impl.shadow_of(n)
            if s is None:
                res["missing"].append(n)
            elif s.shape != p.shape or not torch.equal(s.detach().to(p.dtype), p.detach()):
                res["copies_wrong"].append(n)
        res["max_err_over_tol"] = max(worst, 0.0) if worst_name else None
        res["worst"] = worst_name
        res["ok"] = 0.0 <= worst <= 1.0 and not res["missing"] and not res["copies_wrong"]
    return out


def check_summary(check: dict[str, Any] | None, same_set: bool | None, set_diff: str) -> str:
    """The table's ``check`` cell: ``ok``, or what failed."""
    if check is None:
        return "-"
    parts = []
    if check.get("error"):
        parts.append(f"check raised {check['error']}")
    if check.get("missing"):
        parts.append(f"{len(check['missing'])} tensors not tracked")
    if check.get("copies_wrong"):
        parts.append(f"{len(check['copies_wrong'])} copies wrong")
    r = check.get("max_err_over_tol")
    if r is not None and r > 1.0:
        parts.append(f"values off by {r:.3g}x the tolerance ({check['worst']})")
    if same_set is False:
        parts.append(f"other set: {set_diff}")
    return "; ".join(parts) if parts else "ok"


def _describe(counts: dict[tuple[str, str], int]) -> str:
    words = {"param": "params", "fbuf": "float bufs", "ibuf": "int bufs"}
    order = ("averaged", "copied", "not updated", "untracked")
    parts = []
    for kind in ("param", "fbuf", "ibuf"):
        for state in order:
            c = counts.get((kind, state))
            if c and not (state == "untracked" and kind != "param"):
                parts.append(f"{c} {words[kind]} {state}")
    return ", ".join(parts)


# ---------------------------------------------------------------- running


def _gpu_free() -> int:
    return torch.cuda.mem_get_info()[0]


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class WarmupTimeout(BaseException):
    """Raised (by SIGALRM) when an implementation's warm-up overruns ``--compile-budget-s``.

    A ``BaseException``, so that no ``except Exception`` inside torch.compile or Triton can swallow
    it; the alarm also repeats every second until the warm-up has ended.
    """


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`WarmupTimeout` in the main thread after ``seconds`` (0: no limit).

    Used around warm-up only, where a ``torch.compile`` path compiles; POSIX main thread only
    (elsewhere there is no limit).
    """
    usable = (
        seconds > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    inductor_log = logging.getLogger("torch._inductor")
    level = inductor_log.level

    def on_alarm(signum: int, frame: Any) -> None:
        # inductor logs an interrupted codegen with a full IR dump at CRITICAL; silence it
        inductor_log.setLevel(logging.CRITICAL + 1)
        raise WarmupTimeout(f"warm-up exceeded --compile-budget-s {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        inductor_log.setLevel(level)


def _warm_up(impl: Impl, device: str, calls: int, budget_s: float) -> float:
    """Run ``calls`` updates under the compile budget; returns the last call's ms.

    Sets ``impl.first_update_s``: the wall time of the first update, which is where a compiled
    kernel pays its compilation (what a user waits for at the first ``ema.update()``).
    """
    t = 0.0
    with deadline(budget_s):
        sync(device)
        t0 = time.perf_counter()
        impl.update()
        sync(device)
        impl.first_update_s = time.perf_counter() - t0
        for _ in range(calls - 1):
            t = time_calls(impl.update, device)
        sync(device)
    return t


def _failure(e: BaseException, t0: float) -> str:
    took = f" after {time.perf_counter() - t0:.0f} s"
    cause: BaseException | None = e
    while cause is not None:  # torch.compile wraps what the alarm raised
        if isinstance(cause, WarmupTimeout):
            first = (str(cause).splitlines() or [""])[0]
            return f"warm-up (first updates; torch.compile for fused): {first}{took}"
        cause = cause.__cause__ or cause.__context__
    first = (str(e).splitlines() or [""])[0][:200]
    return f"failed in update(): {type(e).__name__}: {first}{took}"


def _row(wl: Workload, spec: Spec, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "_spec": spec,
        "workload": wl.name,
        "impl": spec.impl,
        "kernel": spec.kernel,
        "dtype": None,
        "n_tensors": None,
        "n_elements": None,
        "tracked": None,
        "same_set": None,
        "set_diff": "",
        "check": None,
        "check_summary": "-",
        "eligible": False,
        "excluded_why": "not timed",
        "ms_median": None,
        "ms_iqr": None,
        "x_floor": None,
        "x_best_peer": None,
        "floor_ms": None,
        "bytes_per_update": None,
        "status": "ok",
        "note": "",
        "reps": 0,
        "inner": 0,
        "samples_ms": [],
        "positions": [],
        "first_update_s": None,
    }
    row.update(kw)
    return row


def _dtype_label(param: torch.dtype, shadow: torch.dtype | None) -> str:
    if shadow is None or shadow == param:
        return _short(param)
    return f"{_short(param)}/{_short(shadow)}"


def calls_per_rep(times_ms: list[float], min_rep_ms: float, max_inner: int) -> int:
    """Calls per timed repetition, the same for every implementation of a workload: enough
    for the fastest one's repetition to last ``min_rep_ms``, at most ``max_inner``. With the
    same count, a repetition's first call (the one that finds the caches holding the previous
    implementation's data) weighs the same in every row."""
    fastest = min(times_ms) if times_ms else min_rep_ms
    return max(1, min(max_inner, math.ceil(min_rep_ms / max(fastest, 1e-3))))


def bench_workload(
    wl: Workload, specs: list[Spec], args: argparse.Namespace, bandwidth: float
) -> list[dict[str, Any]]:
    device = args.device
    rows: list[dict[str, Any]] = []
    live: list[tuple[Spec, Impl]] = []
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    shadow_bytes = sum(t.numel() for _, t in wl.avg) * wl.shadow_dtype.itemsize
    for spec in specs:
        if not spec.applies(wl):
            continue
        try:
            if device == "cuda":
                need = shadow_bytes * (2 if _mixed(wl) else 1) + 2**28
                if _gpu_free() < need:
                    raise Unavailable(
                        f"needs ~{need / 2**30:.1f} GiB of GPU memory, "
                        f"{_gpu_free() / 2**30:.1f} GiB free"
                    )
            impl = spec.make(wl)
        except Unavailable as e:
            rows.append(_row(wl, spec, status="unavailable", note=str(e)))
            continue
        except Exception as e:
            rows.append(_row(wl, spec, status="unavailable", note=f"{type(e).__name__}: {e}"))
            continue
        live.append((spec, impl))
    # the same implementations built again, ``--placements`` times in all: every round times one
    # set of them (round r: set r mod K), so where each one's memory landed averages out
    sets: dict[int, list[Impl]] = {id(impl): [impl] for _, impl in live}
    for _ in range(args.placements - 1):
        for spec, impl in live:
            try:
                sets[id(impl)].append(spec.make(wl))
            except Exception as e:  # it built once: building it again must work too
                raise RuntimeError(f"{spec.key}: a second build failed: {e}") from e
    phases["build"] = time.perf_counter() - t0

    # warm-up (at least 3 updates, so lazy init and first-update copies are past)
    ok: list[tuple[Spec, Impl]] = []
    slow: list[tuple[Spec, Impl, float]] = []
    warm_ms: list[float] = []
    for spec, impl in live:
        tw = time.perf_counter()
        try:
            t = _warm_up(impl, device, max(args.warmup, 3), args.compile_budget_s)
        except (Exception, WarmupTimeout) as e:
            rows.append(_row(wl, spec, status="failed", note=_failure(e, tw)))
            continue
        if t > args.max_update_ms:  # timed once more, kept out of the round-robin
            t = time_calls(impl.update, device)
            if t > args.max_update_ms:
                slow.append((spec, impl, t))
                continue
        for again in sets[id(impl)][1:]:
            _warm_up(again, device, max(args.warmup, 3), args.compile_budget_s)
        warm_ms.append(t)
        ok.append((spec, impl))
    live = ok
    inner = calls_per_rep(warm_ms, args.min_rep_ms, args.max_inner)
    for _, impl in live:
        for each in sets[id(impl)]:
            each.inner = inner
    phases["warmup"] = time.perf_counter() - t0 - phases["build"]

    checked = [impl for _, impl in live] + [i for _, i, _ in slow]
    t1 = time.perf_counter()
    seen = observe_tracking(wl, checked) if checked else {}
    phases["check"] = time.perf_counter() - t1

    # round-robin: every round runs each implementation once (``inner`` calls), in a shuffled
    # order; sample r of every row comes from round r, so rows can be compared round by round
    t1 = time.perf_counter()
    samples: dict[int, list[float]] = {id(impl): [] for _, impl in live}
    positions: dict[int, list[int]] = {id(impl): [] for _, impl in live}
    orders = round_orders(len(live), args.reps, f"{args.seed}:{wl.name}")
    for r, order in enumerate(orders):
        for pos, i in enumerate(order):
            impl = live[i][1]
            placed = sets[id(impl)][r % args.placements]
            samples[id(impl)].append(time_calls(placed.update, device, impl.inner))
            positions[id(impl)].append(pos)
    phases["timed"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    values = verify_values(wl, checked) if checked else {}
    phases["verify"] = time.perf_counter() - t1
    print(
        f"  {wl.name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
        file=sys.stderr,
    )

    for _, impl, t in slow:
        samples[id(impl)] = [t]
        positions[id(impl)] = []
        impl.note = (
            f"{impl.note}; " if impl.note else ""
        ) + f"slow: over --max-update-ms {args.max_update_ms:g}, timed once, not round-robin"
    for spec, impl in live + [(s, i) for s, i, _ in slow]:
        med, iqr = median_iqr(samples[id(impl)])
        info = seen.get(id(impl), {})
        sdt = info.get("shadow_dtype") or wl.shadow_dtype
        nbytes = wl.bytes_per_update(sdt)
        floor_ms = nbytes / bandwidth * 1e3
        check = values.get(id(impl))
        same_set, set_diff = compare_tracked_set(wl, info.get("states", {}))
        why = []
        if not (check and check["ok"]):
            why.append("values differ from the float64 reference lerp")
        if not same_set:
            why.append(f"tracks another set ({set_diff})")
        rows.append(
            _row(
                wl,
                spec,
                kernel=impl.kernel,
                dtype=_dtype_label(wl.param_dtype, sdt),
                n_tensors=info.get("n_tensors"),
                n_elements=info.get("n_elements"),
                tracked=info.get("tracked"),
                same_set=same_set,
                set_diff=set_diff,
                check=check,
                check_summary=check_summary(check, same_set, set_diff),
                eligible=not why,
                excluded_why="; ".join(why),
                ms_median=med,
                ms_iqr=iqr,
                floor_ms=floor_ms,
                x_floor=med / floor_ms,
                bytes_per_update=nbytes,
                note=impl.note,
                reps=len(samples[id(impl)]),
                inner=impl.inner,
                first_update_s=round(impl.first_update_s, 3),
                # per repetition, in round order: sample r of every row was taken in round r
                samples_ms=[round(t, 5) for t in samples[id(impl)]],
                positions=positions[id(impl)],
                status="slow" if any(impl is i for _, i, _ in slow) else "ok",
            )
        )
    peers = [
        r["ms_median"]
        for r in rows
        if r["ms_median"] is not None and is_peer(r["impl"]) and r["eligible"]
    ]
    best = min(peers) if peers else None
    for r in rows:
        if best and r["ms_median"] is not None:
            r["x_best_peer"] = r["ms_median"] / best
    order = {id(s): i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order[id(r.pop("_spec"))])
    del live, samples, seen, sets
    return rows


def train_step_bench(specs: list[Spec], args: argparse.Namespace) -> dict[str, Any]:
    """ViT-B/16, batch 128, 224 px, fp32 weights, bf16 autocast, fused AdamW; +/- each EMA."""
    device = args.device
    torch.manual_seed(0)
    model, arch = build_vit(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.train_batch, 3, 224, 224, device=device)  # one batch, reused
    y = torch.randint(0, 1000, (args.train_batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    wl = Workload("vit_b16_train", arch, model, False, torch.float32, True)
    configs: list[tuple[str, str, Callable[[], None], str]] = [
        ("none", "-", step, "training step without EMA")
    ]
    skipped: list[dict[str, Any]] = []
    for spec in specs:
        if not spec.applies(wl):
            continue
        tw = time.perf_counter()
        try:
            impl = spec.make(wl)
            _warm_up(impl, device, 3, args.compile_budget_s)
        except (Exception, WarmupTimeout) as e:
            skipped.append({"impl": spec.impl, "kernel": spec.kernel, "note": _failure(e, tw)})
            continue

        def step_ema(u: Callable[[], Any] = impl.update) -> None:
            step()
            u()

        step_ema.keep = impl  # type: ignore[attr-defined]
        configs.append((spec.impl, impl.kernel, step_ema, impl.note))
    for _ in range(args.train_warmup):
        for _, _, fn, _ in configs:
            fn()
    sync(device)
    samples: list[list[float]] = [[] for _ in configs]
    for order in round_orders(len(configs), args.train_reps, f"{args.seed}:train_step"):
        for i in order:
            # wall clock around a device-wide synchronize: a side-stream update is counted too
            samples[i].append(
                time_calls(configs[i][2], device, args.train_steps_per_rep, wall=True)
            )
    base, _ = median_iqr(samples[0])
    rows = []
    for (impl, kernel, _, note), s in zip(configs, samples, strict=True):
        med, iqr = median_iqr(s)
        rows.append(
            {
                "impl": impl,
                "kernel": kernel,
                "ms_step_median": med,
                "ms_step_iqr": iqr,
                "ms_added": med - base,
                "pct_added": 100.0 * (med - base) / base,
                "note": note,
            }
        )
    return {
        "model": arch,
        "batch": args.train_batch,
        "image": 224,
        "precision": "fp32 weights, bf16 autocast",
        "optimizer": "torch.optim.AdamW(fused=True)",
        "steps_per_rep": args.train_steps_per_rep,
        "reps": args.train_reps,
        "rows": rows,
        "unavailable": skipped,
    }


# ---------------------------------------------------------------- report


TABLE = [
    ("workload", "workload"),
    ("impl", "impl"),
    ("kernel", "kernel"),
    ("dtype", "dtype"),
    ("n_tensors", "tensors"),
    ("n_elements", "elements"),
    ("tracked", "tracked"),
    ("check_summary", "check"),
    ("ms_median", "ms"),
    ("ms_iqr", "IQR"),
    ("x_floor", "x floor"),
    ("x_best_peer", "x best peer"),
]


def render_table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        if r["status"] in ("unavailable", "failed"):
            r = {**r, "tracked": f"{r['status']}: {r['note']}"}
        elif r["status"] == "slow":
            r = {**r, "tracked": f"{r['tracked']} (slow: timed once)"}
        rows.append(r)
    wl_rows = [
        {
            "workload": w["name"],
            "arch": w["arch"],
            "bytes": w["bytes_per_update"],
            "floor_ms": w["floor_ms"]
            if w.get("floor_is_bound", True)
            else f"{fmt_num(w['floor_ms'])} (fits in cache: not a floor)",
            "inner": w.get("inner"),
            "auto": w.get("polyak_auto_kernel"),
        }
        for w in result["workloads"]
    ]
    bw = result["bandwidth"]
    copy_bw = bw.get("copy_best_bytes_per_s")
    head = (
        f"in-place bandwidth (best of {bw['probes']} probes of {bw['bytes'] / 2**20:.0f} MiB "
        f"fp32, dst.add_(src) and dst.lerp_(src, w): read 2 + write 1, as a lerp): "
        f"{bw['best_bytes_per_s'] / 1e9:.1f} GB/s"
        + (
            f"; dst.copy_(src) counted as read + write, for reference only: "
            f"{copy_bw / 1e9:.1f} GB/s"
            if copy_bw
            else ""
        )
    )
    load = result.get("load") or {}
    parts = []
    if load.get("loaded"):
        parts += [f"**LOADED RUN: {load['why']}**", ""]
    git = result.get("polyak") or {}
    if git.get("tree_dirty"):
        parts += [f"uncommitted changes: {', '.join(git.get('dirty_files') or [])}", ""]
    parts += [
        head,
        "",
        markdown_table(
            wl_rows,
            [
                ("workload", "workload"),
                ("arch", "model"),
                ("bytes", "bytes/update"),
                ("floor_ms", "floor ms"),
                ("inner", "calls/rep"),
                ("auto", "polyak auto kernel"),
            ],
        ),
        "",
        markdown_table(rows, TABLE),
    ]
    ts = result.get("train_step")
    if ts:
        parts += [
            "",
            f"Training step: {ts['model']}, batch {ts['batch']}, {ts['precision']}, {ts['optimizer']}",
            "",
            markdown_table(
                ts["rows"],
                [
                    ("impl", "impl"),
                    ("kernel", "kernel"),
                    ("ms_step_median", "ms/step"),
                    ("ms_step_iqr", "IQR"),
                    ("ms_added", "ms added"),
                    ("pct_added", "% added"),
                ],
            ),
        ]
    return "\n".join(parts)


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for this run's device, checked from the rows.

    Every ratio is ``paired_ratio`` of two rows (or of a row and its floor): the median over the
    round-robin's rounds of the per-round ratio, with a 95% bootstrap interval over rounds. The
    verdict is ``met`` when the whole interval is within the limit, ``NOT met`` when it is all
    beyond it, and ``within noise`` when the limit falls inside it (then ``met`` is the point
    estimate's side: a rerun may flip it).

    Only rows that passed the value check and track the workload's set (``eligible``) count:
    a peer that does not is no candidate for "fastest peer", a reference row that does not
    leaves its target ``excluded``, and so does a polyak row of its own. A floor target on a
    workload small enough to stay in the cache (``floor_is_bound`` false) is ``not a floor``.
    The reference for "polyak <= 1.05x raw" is the raw row with the same inputs as polyak: on
    bf16 weights with fp32 shadows, the chunked upcast (``raw_foreach_lerp/chunked``), not the
    naive one that allocates an fp32 copy of the weights at every update.
    """
    rows = [r for r in result["rows"] if r["ms_median"] is not None]
    device = result["settings"]["device"]
    out: list[dict[str, Any]] = []

    auto = {w["name"]: w.get("polyak_auto_kernel") for w in result["workloads"]}

    def samples(row: dict[str, Any]) -> list[float]:
        return row.get("samples_ms") or [row["ms_median"]]

    def entry(target: str, row: dict[str, Any], limit: float, **kw: Any) -> None:
        out.append(
            {
                "target": target,
                "workload": row["workload"],
                "impl": row["impl"],
                "kernel": row["kernel"],
                "auto": row["kernel"] == auto.get(row["workload"]),
                "ratio": None,
                "ci95": None,
                "limit": limit,
                "met": None,
                **kw,
            }
        )

    def add(
        target: str, row: dict[str, Any], ref: dict[str, Any] | float | None, limit: float
    ) -> None:
        why = []
        if not row.get("eligible"):
            why.append(f"{row['impl']}/{row['kernel']}: {row.get('excluded_why') or 'not checked'}")
        if ref is None:
            why.append("no eligible reference row")
        elif isinstance(ref, dict) and not ref.get("eligible"):
            why.append(
                f"reference {ref['impl']}/{ref['kernel']}: "
                f"{ref.get('excluded_why') or 'not checked'}"
            )
        elif isinstance(ref, float) and row.get("floor_is_bound") is False:
            why.append("the workload fits in the cache: the DRAM floor is not a floor here")
        if why:
            verdict = "not a floor" if "not a floor" in why[-1] else "excluded"
            entry(target, row, limit, verdict=verdict, why="; ".join(why))
            return
        assert ref is not None
        a = samples(row)
        b = [ref] * len(a) if isinstance(ref, float) else samples(ref)
        ratio, lo, hi = paired_ratio(a, b)
        verdict = "met" if hi <= limit else "NOT met" if lo > limit else "within noise"
        entry(target, row, limit, ratio=ratio, ci95=[lo, hi], met=ratio <= limit, verdict=verdict)

    by_wl: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_wl.setdefault(r["workload"], []).append(r)
    for name, group in by_wl.items():
        raw_rows = {r["kernel"]: r for r in group if r["impl"] == RAW}
        mixed = any("/" in (r.get("dtype") or "") for r in group)  # e.g. "bf16/fp32"
        raw = raw_rows.get(RAW_CHUNKED if mixed else "foreach")
        live = raw_rows.get(RAW_LIVE)
        peers = [r for r in group if is_peer(r["impl"])]
        eligible_peers = [r for r in peers if r.get("eligible")]
        best = min(eligible_peers, key=lambda r: r["ms_median"]) if eligible_peers else None
        # the non-reference kernels that round to nearest (stochastic rounding does more work
        # than raw lerp; it has a floor target of its own)
        fast = [
            r
            for r in group
            if r["impl"] == "polyak"
            and r["kernel"] in POLYAK_KERNELS
            and r["kernel"] != "reference"
        ]
        rounded = [r for r in group if r["impl"] == "polyak" and r["kernel"].endswith("+SR")]
        # the drop-ins against polyak.EMA running the same kernel, on any device: what keeping
        # the old class's API costs on top of the engine
        polyak_rows = {r["kernel"]: r for r in group if r["impl"] == "polyak"}
        for r in group:
            if r["impl"].startswith(SHIM):
                add(SHIM_TARGET, r, polyak_rows.get(r["kernel"]), 1.05)
        replica = raw_rows.get(RAW_REPLICA)
        if replica is not None and raw is not None:
            add(CONTROL_TARGET, replica, raw, 1.05)
        for r in group:
            if r["impl"] == "polyak" and r["kernel"].endswith(PAIRS):
                model_row = polyak_rows.get(r["kernel"][: -len(PAIRS)])
                if model_row is not None:
                    add(WATCH_TARGET, model_row, r, 1.05)
                if device == "cpu" and live:
                    add(PAIRS_TARGET, r, live, 1.05)
        if device == "cpu":
            for r in fast:
                if raw and mixed:
                    add("polyak <= 1.05x raw _foreach_lerp_ (chunked fp32 upcast)", r, raw, 1.05)
                elif raw:
                    add("polyak <= 1.05x raw _foreach_lerp_", r, raw, 1.05)
                if live:  # ours, not the issue's: the same inputs as polyak reads
                    add(
                        "polyak <= 1.05x raw _foreach_lerp_ on the live nn.Parameters",
                        r,
                        live,
                        1.05,
                    )
                if name.startswith("resnet50") and peers:
                    add("polyak <= 0.8x fastest peer (ResNet-50)", r, best, 0.8)
                if name == "bf16":
                    add("bf16 params, fp32 shadows <= 1.2x 10 B/elem floor", r, r["floor_ms"], 1.2)
            for r in rounded:
                add("bf16 stochastic rounding <= 1.3x 6 B/elem floor", r, r["floor_ms"], 1.3)
            continue
        for r in fast:
            if name == "transformer":
                add("1.31B fp32 <= 1.05x floor", r, r["floor_ms"], 1.05)
            if name == "bf16":
                add("bf16 params, fp32 shadows <= 1.10x 10 B/elem floor", r, r["floor_ms"], 1.10)
            if name == "resnet50":
                add("ResNet-50 <= 2x floor", r, r["floor_ms"], 2.0)
        for r in rounded:
            add("bf16 stochastic rounding <= 1.1x 6 B/elem floor", r, r["floor_ms"], 1.1)
    train = result.get("train_step") or {}
    for r in train.get("rows", []):
        if r.get("impl") == "polyak" and r.get("pct_added") is not None:
            pct = r["pct_added"]
            out.append(
                {
                    "target": "ViT-B/16 training step: EMA adds < 0.5%",
                    "workload": "train_step",
                    "kernel": r["kernel"],
                    "auto": False,
                    "ratio": pct,
                    "unit": "%",
                    "ci95": None,
                    "limit": 0.5,
                    "met": pct < 0.5,
                    "verdict": "met" if pct < 0.5 else "NOT met",
                }
            )
    return out


def render_targets(
    targets: list[dict[str, Any]], device: str, load: dict[str, Any] | None = None
) -> str:
    lines = [f"## targets ({device})"]
    if load and load.get("loaded"):
        lines.append(f"**LOADED RUN: {load['why']}**")
    lines.append(
        "(auto) marks the kernel polyak picks by default for that workload; each ratio is the "
        "median of per-round ratios, [95% bootstrap interval]; 'within noise': the limit lies "
        "inside the interval; only rows that passed the value check and track the workload's "
        "tensors count"
    )
    if not targets:
        lines.append("- no polyak rows to check")
    for t in targets:
        head = (
            f"- [{t['verdict']}] {t['target']}: {t['workload']} "
            f"{t.get('impl', 'polyak')}/{t['kernel']}"
            f"{' (auto)' if t.get('auto') else ''}"
        )
        if t.get("ratio") is None:
            lines.append(f"{head}: {t.get('why', '')}")
            continue
        ci = t.get("ci95")
        spread = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] != ci[1] else ""
        unit = t.get("unit", "x")
        lines.append(f"{head} = {t['ratio']:.3f}{unit}{spread} (limit {t['limit']}{unit})")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--workloads",
        nargs="*",
        choices=list(WORKLOADS),
        default=list(WORKLOADS),
        metavar="NAME",
        help=f"workloads to run (default: all): {', '.join(WORKLOADS)}",
    )
    p.add_argument(
        "--impls",
        nargs="*",
        default=None,
        metavar="IMPL[:KERNEL]",
        help="only these implementations (e.g. polyak:foreach raw_foreach_lerp timm_v3)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (40)")
    p.add_argument(
        "--placements",
        type=int,
        default=None,
        help="build every implementation this many times and time round r on set r mod K, so "
        "where each one's memory landed averages out (cpu 3, cuda 1: GPU memory)",
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up updates (cpu 3, cuda 5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 reps, fewer train reps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--min-rep-ms", type=float, default=None, help="min ms per timed repetition")
    p.add_argument("--max-inner", type=int, default=200, help="max calls per repetition")
    p.add_argument(
        "--compile-budget-s",
        type=float,
        default=None,
        help="max seconds for one impl's warm-up, where torch.compile runs (240; 0: none)",
    )
    p.add_argument(
        "--cpu-fused",
        choices=("bf16", "all", "none"),
        default="bf16",
        help="where polyak's fused (torch.compile) kernel runs on the CPU: the bf16 workloads "
        "(default: its compile costs 10-60 s per workload, and on fp32 foreach is as fast), "
        "all workloads, or none; on CUDA it runs everywhere",
    )
    p.add_argument(
        "--max-update-ms",
        type=float,
        default=None,
        help="an update slower than this is timed once, outside the round-robin (cpu 3000, cuda 1000)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the per-round shuffled order (default 0)"
    )
    p.add_argument(
        "--raw-chunk-mib",
        type=float,
        default=None,
        help="fp32 scratch of the raw chunked row (bf16 weights, fp32 shadows), MiB "
        "(default: a quarter of the last-level cache, 1 to 64 MiB)",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="busy cores of other processes above which the run is marked loaded "
        "(default: 10%% of the cores, at least 0.5)",
    )
    p.add_argument(
        "--require-quiet",
        action="store_true",
        help="refuse to start when other processes are above --max-load (measured over 2 s)",
    )
    p.add_argument("--timm-file", default=None, help="path to timm/utils/model_ema.py")
    p.add_argument("--train-step", action="store_true", help="also time ViT-B/16 steps (cuda)")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-reps", type=int, default=None, help="train-step repetitions (10)")
    p.add_argument("--train-steps-per-rep", type=int, default=3)
    p.add_argument("--train-warmup", type=int, default=3, help="warm-up steps per config")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    p.add_argument("--list", action="store_true", help="list workloads and impls, then exit")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.reps is None:
        args.reps = 5 if args.quick else 40
    if args.warmup is None:
        args.warmup = 1 if args.quick else (5 if cuda else 3)
    if args.placements is None:
        args.placements = 1 if (args.quick or cuda) else 3
    if args.placements < 1:
        raise SystemExit(f"--placements must be at least 1, got {args.placements}")
    if args.train_reps is None:
        args.train_reps = 3 if args.quick else 10
    if args.compile_budget_s is None:
        args.compile_budget_s = 240.0  # 2 CPU cores, cold cache: fused+SR takes ~3 min
    if args.max_update_ms is None:
        args.max_update_ms = 1000.0 if cuda else 3000.0
    if args.min_rep_ms is None:
        args.min_rep_ms = 5.0 if cuda else 20.0
    if args.max_load is None:
        args.max_load = load_threshold(os.cpu_count())
    if args.raw_chunk_mib is not None and args.raw_chunk_mib <= 0:
        p.error(f"--raw-chunk-mib must be positive, got {args.raw_chunk_mib}")
    if args.train_step and not cuda:
        p.error("--train-step needs --device cuda (a GPU training step)")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    return args


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def select_specs(patterns: list[str] | None) -> list[Spec]:
    if not patterns:
        return list(SPECS)
    chosen = [s for s in SPECS if any(s.key == q or s.impl == q for q in patterns)]
    unknown = [q for q in patterns if not any(s.key == q or s.impl == q for s in SPECS)]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; known: {[s.key for s in SPECS]}")
    return chosen


def _apply_floors(rows: list[dict[str, Any]], workloads: list[dict[str, Any]], bw: float) -> None:
    """Floors (and x floor) from the best in-place bandwidth seen so far; a workload that fits
    in the cache keeps its number but is marked ``floor_is_bound: false``."""
    bound = {w["name"]: w.get("floor_is_bound", True) for w in workloads}
    for r in rows:
        if r["bytes_per_update"] is not None:
            r["floor_ms"] = r["bytes_per_update"] / bw * 1e3
            r["x_floor"] = r["ms_median"] / r["floor_ms"]
            r["floor_is_bound"] = bound.get(r["workload"], True)
    for w in workloads:
        w["floor_ms"] = w["bytes_per_update"] / bw * 1e3


def floor_is_bound(working_set: int, cache: int | None) -> bool:
    """A DRAM-bandwidth floor bounds an update only when its data cannot stay in the cache:
    more than ``CACHE_RESIDENT_FACTOR`` last-level caches of distinct bytes (unknown cache:
    assumed so)."""
    return cache is None or working_set > CACHE_RESIDENT_FACTOR * cache


def probe_bandwidth(device: str, nbytes: int) -> list[dict[str, Any]]:
    """The in-place probes whose traffic is a lerp's (``add``, ``lerp``), 10 calls each."""
    return [memory_bandwidth(device, nbytes, reps=10, op=op) for op in ("add", "lerp")]


def assemble(
    args: argparse.Namespace,
    run: dict[str, Any],
    probes: list[dict[str, Any]],
    copy_probe: dict[str, Any] | None,
    workloads: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    train: dict[str, Any] | None,
    *,
    complete: bool,
) -> dict[str, Any]:
    """The result document; ``complete`` is false for the copies written after each workload."""
    bw = max(p["best_bytes_per_s"] for p in probes)
    _apply_floors(rows, workloads, bw)
    foreign = run["monitor"].stop()
    loaded, why = load_verdict([run["foreign_start"], foreign], args.max_load)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "update_speed",
        "complete": complete,
        "date": run["started"].isoformat(timespec="seconds"),
        **run["meta"],
        "timm_ema_source": _TIMM.get("info") or _TIMM.get("error"),
        "decay": DECAY,
        "decay_note": "constant for every implementation (warm-ups off); checked per row",
        "settings": {
            "device": args.device,
            "reps": args.reps,
            "warmup": args.warmup,
            "placements": args.placements,
            "threads": torch.get_num_threads(),
            "min_rep_ms": args.min_rep_ms,
            "max_inner": args.max_inner,
            "seed": args.seed,
            "verify_steps": VERIFY_STEPS,
            "verify_shift": VERIFY_SHIFT,
            "compile_budget_s": args.compile_budget_s,
            "cpu_fused": args.cpu_fused,
            "raw_chunk_mib": args.raw_chunk_mib,
            "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "max_update_ms": args.max_update_ms,
            "max_load": args.max_load,
            "quick": args.quick,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        },
        "bandwidth": {
            "method": "best of the in-place fp32 probes dst.add_(src, alpha=0) and "
            "dst.lerp_(src, 1e-3); bytes moved = read src + read dst + write dst",
            "bytes": probes[0]["bytes"],
            "probes": 10 * len(probes),
            "best_bytes_per_s": bw,
            "runs": probes,
            "cache_bytes": cache_bytes(args.device),
            "copy_best_bytes_per_s": copy_probe["best_bytes_per_s"] if copy_probe else None,
            "copy_note": "dst.copy_(src) counted as read + write; a CPU also reads dst before "
            "writing it (write-allocate), so this reads low; informational, not used for floors",
        },
        "workloads": workloads,
        "rows": rows,
        "train_step": train,
        "elapsed_s": round(time.perf_counter() - run["t_start"], 1),
        # 1/5/15-minute load averages before and after (they include this run's own threads)
        "load_avg": {"start": run["load_start"], "end": _load_avg()},
        "load": {
            "loaded": loaded,
            "why": why,
            "threshold_cores": args.max_load,
            # busy cores of other processes: over 2 s before the run, and over the run
            "foreign_cores_before": run["foreign_start"],
            "foreign_cores_during": foreign,
        },
    }
    result["targets"] = evaluate_targets(result)
    return result


def sample_foreign_load(seconds: float = 2.0) -> float | None:
    """Busy cores of other processes over ``seconds`` while this one sleeps."""
    monitor = LoadMonitor().start()
    time.sleep(seconds)
    return monitor.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.list:
        for name, fn in WORKLOADS.items():
            print(f"{name:18s} {fn.__name__}")
        for s in SPECS:
            print(s.key)
        return {}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    _TIMM["path"] = args.timm_file
    _CPU_FUSED["policy"] = args.cpu_fused
    _RAW_CHUNK["bytes"] = None if args.raw_chunk_mib is None else int(args.raw_chunk_mib * 2**20)
    specs = select_specs(args.impls)
    foreign_start = sample_foreign_load()
    loaded, why = load_verdict([foreign_start], args.max_load)
    if loaded:
        if args.require_quiet:
            raise SystemExit(f"--require-quiet: {why}")
        print(f"warning: {why}; the run will be marked loaded", file=sys.stderr)
    # what the run measures (machine, versions, the commit) is read once, before the first number
    run = {
        "started": utc_now(),
        "t_start": time.perf_counter(),
        "load_start": _load_avg(),
        "foreign_start": foreign_start,
        "monitor": LoadMonitor().start(),
        "meta": {
            "machine": machine_info(args.device),
            "torch": torch.__version__,
            "peers": package_versions(PEER_PACKAGES),
            "polyak": {**package_versions(["polyak"]), **git_commit()},
        },
    }
    if run["meta"]["polyak"].get("tree_dirty"):
        files = ", ".join(run["meta"]["polyak"]["dirty_files"][:5])
        print(f"warning: uncommitted changes ({files}): recorded in the JSON", file=sys.stderr)
    torch.manual_seed(0)
    out = None
    if not args.no_write:
        day = run["started"].date().isoformat()
        out = Path(args.out) if args.out else RESULTS_DIR / f"update_speed_{args.device}_{day}.json"

    probe_bytes = (1 << 30) if args.device == "cuda" else (256 << 20)
    probes = probe_bandwidth(args.device, probe_bytes)
    bw0 = max(p["best_bytes_per_s"] for p in probes)
    print(f"in-place bandwidth: {bw0 / 1e9:.1f} GB/s", file=sys.stderr)
    cache = cache_bytes(args.device)

    all_rows: list[dict[str, Any]] = []
    wl_info: list[dict[str, Any]] = []
    for name in args.workloads:
        t0 = time.perf_counter()
        wl = WORKLOADS[name](args.device)
        bw = max(p["best_bytes_per_s"] for p in probes)
        rows = bench_workload(wl, specs, args, bw)
        info = wl.summary()
        info["polyak_auto_kernel"] = polyak_auto_kernel(wl)
        info["inner"] = next(
            (r["inner"] for r in rows if r.get("inner") and r.get("reps", 0) > 1), None
        )
        info["cache_bytes"] = cache
        info["floor_is_bound"] = floor_is_bound(info["working_set_bytes"], cache)
        wl_info.append(info)
        all_rows += rows
        del wl
        _free_memory(args.device)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if out:  # what is done so far survives a run that is killed later (a device time limit)
            partial = assemble(args, run, probes, None, wl_info, all_rows, None, complete=False)
            write_json_atomic(out, partial)

    # the probes again at the end; the floor uses the best bandwidth seen in the run
    probes += probe_bandwidth(args.device, probe_bytes)
    copy_probe = memory_bandwidth(args.device, probe_bytes, reps=10, op="copy")

    train = None
    if args.train_step:
        t0 = time.perf_counter()
        extra = [s for s in TRAIN_EXTRA_SPECS if not args.impls or s.impl in args.impls]
        train = train_step_bench(specs + extra, args)
        print(f"train step: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    result = assemble(args, run, probes, copy_probe, wl_info, all_rows, train, complete=True)
    print(render_table(result))
    print()
    print(render_targets(result["targets"], args.device, result["load"]))
    print(f"\n(elapsed {result['elapsed_s']} s)")
    if result["load"]["loaded"]:
        print(f"warning: LOADED RUN: {result['load']['why']}", file=sys.stderr)
    if out:
        write_json_atomic(out, result)
        print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
