"""Stochastic rounding of fp32 results into bf16 shadows, with a private counter-based RNG.

A bf16 shadow cannot move by less than half an ulp (2**-9 of its value) under round-to-nearest, so
a slow average stalls. Rounding up with probability equal to the discarded fraction makes the
rounded value exact in expectation (:math:`E[\\mathrm{sr}(x)] = x`), so tiny updates accumulate.

The random bits come from a stateless hash of (seed, update counter, element index): no generator
object, no global RNG touched, the same bits on every device and under ``torch.compile``, and a
fixed seed reproduces a run exactly.

The stream, in 32-bit unsigned arithmetic (``>>`` logical, products mod 2**32)::

    mix(h)  = lowbias32: h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15; h *= 0x846CA68B; h ^= h >> 16
    key     = mix(mix(seed) + counter * 0x9E3779B9)           # once per update, a scalar
    h       = (offset + i + key) * 0x7FEB352D                 # element i of a tensor at `offset`
    h       = (h ^ (h >> 16)) * 0x846CA68B
    bits16  = h >> 16                                         # the top 16 bits, in [0, 65536)

``offset + i`` is the element's position in the random stream (:func:`stream_offsets`): a tensor
starts where the ones before it in its slot end, and slot ``k`` of an N-slot update (``k`` = 0, 1,
...) is shifted by ``k`` times the elements of one slot, so its N slots draw N disjoint stretches
and slot 0 draws exactly the bits of a one-slot update. Positions count the elements of the *full*
tensors: a shard (a DTensor's local block, FSDP2) starts at its block's place in its full tensor,
so ranks holding different shards draw different bits for their different elements (the same seed
on every rank would otherwise round element ``i`` of every rank's shard alike), ranks holding
replicas of one shard (HSDP) draw the same bits and their shadows stay equal, and an FSDP2 run
(``Shard(0)``) rounds exactly as the unsharded run with the same seed.

Why the per-element part may be this cheap: ``key`` is a full hash of (seed, counter), so for a
fixed element the words ``offset + i + key`` of successive updates are uniform and independent of
one another; the rest is a bijection of 32-bit words (odd multiplies, an xorshift), which keeps
them uniform, so each update's 16 bits are uniform and independent of the element's past. The
element mix only has to decorrelate neighbouring elements within one update.

The rounding adds the 16 bits below the kept half of the fp32 pattern (:func:`round_to_bf16_bits`);
on the CPU it is computed with float operations only (:func:`round_to_bf16_float`): the CPU compiler
vectorises them, while a float -> int32 bit reinterpretation goes through a scalar loop there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# lowbias32 (C. Wellons' 32-bit integer hash) constants, as signed int32: 32-bit multiplies
# vectorise on every CPU (64-bit ones do not on AVX2) and are native on GPUs.
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9 - (1 << 32)

# bounds of the fp32 range where round_to_bf16_float equals round_to_bf16_bits (see there)
_SMALLEST_SPLIT = 2.0**-118
_SPLIT_MAX = 2.0**104


def _shr(h: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 bit patterns (torch's >> is arithmetic on signed ints)."""
    return (h >> k) & ((1 << (32 - k)) - 1)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """lowbias32: every output bit depends on every input bit (int32, wrapping arithmetic)."""
    h = (h ^ _shr(h, 16)) * _M1
    h = (h ^ _shr(h, 15)) * _M2
    return h ^ _shr(h, 16)


def _int32(n: int) -> int:
    """``n mod 2**32`` as a signed int32 value."""
    return ((n + (1 << 31)) % (1 << 32)) - (1 << 31)


def stream_key(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The per-update key ``mix(mix(seed) + counter * φ)`` (0-dim int32), φ = 0x9E3779B9."""
    return _mix(_mix(seed.to(torch.int32)) + counter.to(torch.int32) * _GOLDEN)


def random_bits16(numel: int, key: torch.Tensor, offset: int, device: torch.device) -> torch.Tensor:
    """16 uniform random bits per element (int32 in [0, 65536)) for elements offset..offset+numel.

    ``h = (offset + i + key) * M1; h = (h ^ h >> 16) * M2; bits = h >> 16`` (see the module
    docstring). ``i * M1`` does not depend on the tensor, so the compiler shares it between the
    tensors it fuses into one loop, and ``(key + offset) * M1`` is a scalar.
    """
    index = torch.arange(numel, dtype=torch.int32, device=device)
    h = index * _M1 + (key + _int32(offset)) * _M1
    h = (h ^ _shr(h, 16)) * _M2
    return _shr(h, 16)


def round_to_bf16(x: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """bf16 of the fp32 ``x``, rounded up in magnitude with probability = the dropped fraction.

    Defined in integer arithmetic on the fp32 pattern (:func:`round_to_bf16_bits`); on the CPU
    computed with float operations that give the same result (:func:`round_to_bf16_float`),
    because inductor's CPU code reinterprets float bits through a slow scalar loop.
    """
    if x.device.type == "cpu":
        return round_to_bf16_float(x, bits16)
    return round_to_bf16_bits(x, bits16)


def round_to_bf16_bits(x: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """``trunc16(bits(x) + b)``: add to the fp32 pattern, clear its low 16 bits.

    ``b = bits16`` for ``x >= 0`` and ``b = bits16 ^ 0xFFFF`` for ``x < 0``: the magnitude rounds
    up exactly when the low half carries, with probability ``low16 / 2**16`` (for ``x < 0`` when
    ``bits16 < low16``). NaN and ±inf are left as they are. The Triton kernel computes this form.
    """
    raw = x.view(torch.int32)
    b = bits16 ^ ((raw >> 31) & 0xFFFF)  # raw >> 31 is -1 for x < 0 (arithmetic), else 0
    rounded = (raw + b) & -65536  # clear the low 16 bits (0xFFFF0000 as int32)
    rounded = torch.where(torch.isfinite(x), rounded, raw)
    return rounded.view(torch.float32).to(torch.bfloat16)


def round_to_bf16_float(x: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """:func:`round_to_bf16_bits` with float operations only (vectorised by the CPU compiler).

    ``sr(x) = floor(x / g + bits16 * 2**-16) * g`` with ``g`` the bf16 spacing (ulp) of ``|x|``'s
    binade: ``x / g`` has at most 16 fractional bits, so adding ``u = bits16 / 2**16`` (uniform on
    the same grid) and flooring is exact, and ``E[floor(q + u)] = q``. For ``x < 0`` the floor
    rounds towards ``-inf``, which is up in magnitude when ``u < frac``: again with probability
    ``frac``. For finite ``2**-118 <= |x| < 2**105`` this is bit for bit
    :func:`round_to_bf16_bits`, except that a zero result is always +0.

    ``g`` without bit access: ``a = clamp(|x|, 2**-118, 2**104)``; Veltkamp's split
    ``s = y * (2**23 + 1); p = s - (s - y)`` rounds ``y = 1.5 * a`` to one significant bit, i.e.
    ``p = 2 * 2**floor(log2(a))`` (ties go to that even result), and ``g = p * 2**-8``. The lower
    clamp keeps ``g >= 2**-125`` a normal number, so flushing subnormals to zero
    (``torch.set_flush_denormal(True)``) can never make ``g`` zero and a zero shadow NaN; below
    ``2**-118`` (1e-36) values round on that coarser grid, still without bias up to one fp32
    rounding. The upper clamp keeps ``s`` finite; from ``2**105`` (4e31) up a value still rounds to
    one of its two bf16 neighbours, but not exactly with the right probability. ``2**23 + 1`` is
    exact in fp32, so ``s`` is the exact ``y * 2**23 + y`` rounded once, as an FMA would give.
    NaN stays NaN and ±inf stays ±inf (``inf / g + u`` floors to inf).

    Each intermediate is used as few times as possible (one ``clamp``, one product for ``s``):
    the compiler inlines a pointwise value into every use before it removes common terms, so
    re-used terms multiply the size of what it lowers, and that size is its compile time.
    """
    y = x.abs().clamp(_SMALLEST_SPLIT, _SPLIT_MAX) * 1.5
    s = y * 8388609.0
    g = (s - (s - y)) * 2.0**-8
    return (torch.floor(x / g + bits16.float() * 2.0**-16) * g).to(torch.bfloat16)


def stream_offsets(
    shadows: Sequence[torch.Tensor],
    slot: int = 0,
    positions: Sequence[tuple[int, int]] | None = None,
) -> list[int]:
    """Where each of one slot's shadows starts in the random stream, for slot ``slot``.

    :math:`o_{k,i} = \\sum_{j<i} n_j + a_i + k \\sum_j n_j` for the shadow ``i`` of slot ``k``,
    with :math:`n_j` the elements of shadow ``j``'s full tensor and :math:`a_i` the start of the
    shadow's elements in its full tensor: ``positions[i] = (n_i, a_i)``, given for shards
    (``polyak._store.ShadowStore.positions``), else ``(numel, 0)`` for each shadow, the start of
    the shadow in the concatenation of one slot's shadows. Slot ``k`` is shifted by ``k`` slots;
    slot 0 is the offset every one-slot update has always used.
    """
    if positions is None:
        positions = [(shadow.numel(), 0) for shadow in shadows]
    if len(positions) != len(shadows):
        raise ValueError(
            f"positions: expected one (numel, start) per shadow, {len(shadows)}, got "
            f"{len(positions)}."
        )
    offsets, total = [], 0
    for numel, start in positions:
        offsets.append(total + start)
        total += numel
    return [offset + slot * total for offset in offsets]


def keyed_stochastic_lerp(
    shadow: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    key: torch.Tensor,
    offset: int,
) -> torch.Tensor:
    """``sr(lerp(shadow, source, weight))`` in fp32 with this update's ``key``, as a new bf16 tensor."""
    value = torch.lerp(shadow.float(), source.float(), weight.float())
    bits = random_bits16(shadow.numel(), key, offset, shadow.device).view(shadow.shape)
    return round_to_bf16(value, bits)


def keyed_stochastic_lerp_(
    shadow: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    key: torch.Tensor,
    offset: int,
) -> None:
    """``shadow = sr(lerp(shadow, source, weight))`` in fp32, with this update's ``key``."""
    shadow.copy_(keyed_stochastic_lerp(shadow, source, weight, key, offset))


def stochastic_lerp_(
    shadow: torch.Tensor,
    source: torch.Tensor,
    weight: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    offset: int,
) -> None:
    """``shadow = sr(shadow + weight * (source - shadow))`` computed in fp32, rounded stochastically."""
    keyed_stochastic_lerp_(shadow, source, weight, stream_key(seed, counter), offset)
