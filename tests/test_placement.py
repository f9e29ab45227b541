"""polyak._placement: values enter live tensors, and what the live tensors held comes back bit for bit.

Plain tensors are re-pointed (``.data``, no copy); DTensors (here on a world-size-1 gloo group in
this process, sharded on dim 0) get an in-place copy into their local shard, whose storage never
changes. "Bit for bit" is checked on the integer view of the bits, with -0.0, NaN and inf among the
values (an arithmetic round trip would lose them). The EMA through FSDP2 on 2 ranks is in
tests/test_fsdp2.py.
"""

from __future__ import annotations

import pytest
import torch

from polyak import _placement
from polyak._placement import Backup


def special(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(0)
    t = torch.randn(shape).to(dtype)
    flat = t.view(-1)
    flat[:3] = torch.tensor([-0.0, float("nan"), float("inf")]).to(dtype)
    return t


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}
    return t.detach().contiguous().view(ints[t.dtype]).clone()


# ------------------------------------------------------------------ plain tensors: re-pointing


def test_put_re_points_plain_tensors_and_takes_back_their_own_storage():
    live = torch.nn.Parameter(special((4, 3)))
    value = torch.randn(4, 3)
    own, own_bits = live.data_ptr(), bits(live)
    backup = Backup()
    _placement.put([(live, value)], backup)
    assert live.data_ptr() == value.data_ptr()  # views the value: nothing copied
    assert torch.equal(live, value)
    assert backup.lives() == [live]
    _placement.take_back(backup)
    assert live.data_ptr() == own
    assert torch.equal(bits(live), own_bits)
    assert not backup


def test_put_casts_a_value_of_another_dtype_and_restores_exactly():
    live = torch.nn.Parameter(special((5,), torch.bfloat16))
    value = torch.randn(5, dtype=torch.float32)
    own, own_bits = live.data_ptr(), bits(live)
    backup = Backup()
    _placement.put([(live, value)], backup)
    assert live.dtype == torch.bfloat16 and live.data_ptr() != value.data_ptr()
    assert torch.equal(live, value.to(torch.bfloat16))
    _placement.take_back(backup)
    assert live.data_ptr() == own and torch.equal(bits(live), own_bits)


def test_save_write_take_back_copy_in_place_and_never_re_point():
    """store()/copy_to()/restore(): a CUDA graph keeps the storage it captured."""
    live = torch.nn.Parameter(special((3, 2)))
    value = torch.randn(3, 2, dtype=torch.float64)
    own, own_bits = live.data_ptr(), bits(live)
    backup = Backup()
    _placement.save([live], backup)
    _placement.write([(live, value)])
    assert live.data_ptr() == own
    assert torch.equal(live, value.float())
    _placement.take_back(backup)
    assert live.data_ptr() == own and torch.equal(bits(live), own_bits)


def test_placing_over_a_held_backup_is_refused_and_changes_nothing():
    live, value = torch.zeros(2), torch.ones(2)
    backup = Backup()
    _placement.put([(live, value)], backup)
    other = torch.full((2,), 7.0)
    with pytest.raises(RuntimeError, match="take them back"):
        _placement.put([(other, value)], backup)
    with pytest.raises(RuntimeError, match="take them back"):
        _placement.save([other], backup)
    assert torch.equal(other, torch.full((2,), 7.0))
    _placement.take_back(backup)
    assert torch.equal(live, torch.zeros(2))


def test_plain_tensors_are_not_placed_in_place():
    t = torch.zeros(2)
    assert not _placement.in_place(t)
    assert _placement.local(t) is t


# ------------------------------------------------------------------ DTensors: copies into the shard


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    init = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded(mesh, t: torch.Tensor):
    from torch.distributed.tensor import Shard, distribute_tensor

    return torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]))


def test_dtensors_are_placed_in_place_through_their_local_shard(mesh):
    live = sharded(mesh, special((4, 3)))
    assert _placement.in_place(live)
    shard = _placement.local(live)
    assert shard.shape == (4, 3) and not _placement.in_place(shard)
    shard.fill_(2.0)  # a view of the shard's storage, not a copy
    assert torch.equal(live.to_local(), torch.full((4, 3), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_put_copies_into_the_shard_and_takes_back_bit_for_bit(mesh, dtype):
    live = sharded(mesh, special((4, 3), dtype))
    value = sharded(mesh, torch.randn(4, 3))  # fp32 averages of a bf16 weight: cast on the way in
    shard = _placement.local(live)
    own, own_bits = shard.data_ptr(), bits(shard)
    backup = Backup()
    _placement.put([(live, value)], backup)
    assert _placement.local(live).data_ptr() == own  # the shard's storage is never replaced
    assert torch.equal(shard, value.to_local().to(dtype))
    _placement.take_back(backup)
    assert shard.data_ptr() == own and torch.equal(bits(shard), own_bits)
    assert not backup


def test_write_copies_into_the_shard(mesh):
    live = sharded(mesh, torch.zeros(4, 3))
    value = sharded(mesh, torch.randn(4, 3))
    own = _placement.local(live).data_ptr()
    _placement.write([(live, value)])
    assert _placement.local(live).data_ptr() == own
    assert torch.equal(live.to_local(), value.to_local())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_planned_write_back_copies_into_the_shard_and_follows_its_values(mesh, dtype):
    """WriteBack (Switch-EMA's write): planned once over the local shards, every call copies the
    values as they are then, cast to the live dtype, into the same storage; a set gate skips."""
    live = sharded(mesh, special((4, 3), dtype))
    value = sharded(mesh, torch.randn(4, 3))
    plain, plain_value = torch.nn.Parameter(torch.zeros(2)), torch.tensor([1.5, -2.0])
    own = _placement.local(live).data_ptr()
    write = _placement.WriteBack([live, plain], [value, plain_value])
    start = value.to_local().clone()
    for _ in range(2):
        with torch.no_grad():  # the planned shard views see later values
            value.to_local().mul_(3.0)
            plain_value.add_(1.0)
        write()
        assert _placement.local(live).data_ptr() == own
        assert torch.equal(live.to_local(), value.to_local().to(dtype))
        assert torch.equal(plain.detach(), plain_value)
    assert torch.equal(live.to_local(), (start * 3.0 * 3.0).to(dtype))  # the values then
    held = bits(_placement.local(live))
    with torch.no_grad():
        value.to_local().add_(1.0)
    write(torch.tensor(True))
    assert torch.equal(bits(_placement.local(live)), held)
    with pytest.raises(TypeError, match=r"live tensor is a DTensor"):
        _placement.WriteBack([live], [torch.ones(4, 3)])


def test_a_plain_value_for_a_dtensor_is_refused_before_anything_changes(mesh):
    first = sharded(mesh, torch.zeros(2, 2))
    second = sharded(mesh, torch.zeros(4, 3))
    backup = Backup()
    pairs = [(first, sharded(mesh, torch.ones(2, 2))), (second, torch.ones(4, 3))]
    with pytest.raises(TypeError, match=r"live tensor is a DTensor.*full_tensor"):
        _placement.put(pairs, backup)
    with pytest.raises(TypeError, match=r"value is a DTensor"):
        _placement.write([(torch.zeros(4, 3), sharded(mesh, torch.ones(4, 3)))])
    assert not backup
    assert torch.equal(first.to_local(), torch.zeros(2, 2))


def test_a_differently_sharded_value_is_refused(mesh):
    live = sharded(mesh, torch.zeros(4, 3))
    with pytest.raises(
        ValueError, match=r"local shard has shape \(4, 3\) here, the value's \(2, 3\)"
    ):
        _placement.write([(live, sharded(mesh, torch.ones(2, 3)))])
    assert torch.equal(live.to_local(), torch.zeros(4, 3))
