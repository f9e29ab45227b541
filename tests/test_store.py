"""The shadow store (polyak._store): one shadow per (slot, name), one dtype policy."""

from __future__ import annotations

import pytest
import torch

from polyak._store import ShadowStore, local


def tracked():
    return [
        ("w", torch.randn(3, 2, dtype=torch.bfloat16), "average"),
        ("h", torch.randn(4, dtype=torch.float16), "average"),
        ("d", torch.randn(2, dtype=torch.float64), "average"),
        ("n", torch.tensor(7), "copy"),
    ]


def test_dtype_policy_and_values():
    pairs = tracked()
    store = ShadowStore(pairs)
    want = {"w": torch.float32, "h": torch.float32, "d": torch.float64, "n": torch.int64}
    for name, tensor, _ in pairs:
        shadow = store.get(name)
        assert shadow.dtype == want[name], name
        assert torch.equal(shadow, tensor.to(shadow.dtype))  # exact: widening casts
        assert shadow.data_ptr() != tensor.data_ptr()  # a copy, not a view
    forced = ShadowStore(pairs, shadow_dtype=torch.bfloat16)
    assert [forced.get(n).dtype for n in "whdn"] == [torch.bfloat16] * 3 + [torch.int64]


def test_slots_have_their_own_shadows_and_share_copies():
    store = ShadowStore(tracked(), slots=("fast", "slow"))
    assert store.get("w", "fast") is not store.get("w", "slow")
    assert torch.equal(store.get("w", "fast"), store.get("w", "slow"))
    assert store.get("n", "fast") is store.get("n", "slow")
    assert store.get("w") is store.get("w", "fast")  # the first slot by default
    lists = store.slot_lists()
    assert [len(s) for s in lists] == [3, 3]
    assert lists[1][0] is store.get("w", "slow") and lists[0][2] is store.get("d", "fast")
    assert store.copy_list() == [store.get("n")]
    assert store.names() == ["w", "h", "d", "n"]
    assert [n for n, _ in store.items("slow")] == ["w", "h", "d", "n"]
    assert len(list(store.all())) == 3 * 2 + 1
    assert store.kind("w") == "average" and store.kind("n") == "copy" and store.kind("x") is None


def test_recast_and_to_keep_the_objects():
    store = ShadowStore(tracked(), slots=("a", "b"), shadow_dtype=None)
    held = store.get("d", "b")
    store.recast("d", torch.zeros(2, dtype=torch.bfloat16))  # the tensor became bf16
    assert store.get("d", "b") is held and held.dtype == torch.float32
    store.recast("d", torch.zeros(2, dtype=torch.float64))
    assert held.dtype == torch.float64
    store.to("cpu")
    assert store.get("d", "b") is held
    store.to("meta")
    assert store.get("d", "b").is_meta and store.get("n").is_meta
    with pytest.raises(KeyError):
        store.recast("nope", torch.zeros(2))


def rows_of(store, name):
    """The (N, *shape) tensor whose rows are ``name``'s slot shadows, or None if they are not."""
    from polyak._kernels._foreach import stacked_rows

    rows = stacked_rows([[store.get(name, slot)] for slot in store.slots])
    return None if rows is None else rows[0]


def test_several_slots_are_rows_of_one_tensor_laid_out_like_the_weight():
    weight = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    pairs = [
        ("w", weight, "average"),
        ("s", torch.randn(()), "average"),
        ("n", torch.tensor(7), "copy"),
    ]
    store = ShadowStore(pairs, slots=("a", "b", "c"))
    for name in ("w", "s"):
        rows = rows_of(store, name)
        assert rows is not None and rows.shape[0] == 3, name
        for k, slot in enumerate(store.slots):
            assert torch.equal(store.get(name, slot), rows[k])
    assert store.get("w", "b").stride() == weight.stride()  # channels_last kept per row
    assert torch.equal(store.get("w", "c"), weight)
    assert rows_of(ShadowStore(pairs[:1]), "w") is None  # one slot: a tensor of its own
    # a recast and a move keep every slot's object and keep the slots rows of one tensor
    held = [store.get("w", slot) for slot in store.slots]
    store.recast("w", weight.double())
    assert [store.get("w", slot) for slot in store.slots] == held
    assert held[0].dtype == torch.float64 and rows_of(store, "w") is not None
    store.to("cpu")
    assert rows_of(store, "w") is not None and store.get("w", "a") is held[0]
    store.to("meta")
    assert all(store.get(n, slot).is_meta for n in ("w", "s") for slot in store.slots)


def test_an_update_of_one_row_leaves_the_other_slots_alone():
    store = ShadowStore([("w", torch.zeros(4), "average")], slots=("a", "b"))
    store.get("w", "a").add_(1)
    assert torch.equal(store.get("w", "b"), torch.zeros(4))


def test_clear_errors():
    with pytest.raises(ValueError, match=r"slots must be distinct names, at least one, got \[\]"):
        ShadowStore(tracked(), slots=())
    with pytest.raises(ValueError, match=r"got \['a', 'a'\]"):
        ShadowStore(tracked(), slots=("a", "a"))
    with pytest.raises(ValueError, match="kind must be 'average' or 'copy', got 'keep' for 'x'"):
        ShadowStore([("x", torch.zeros(1), "keep")])
    with pytest.raises(KeyError, match=r"no slot 'c'; this average keeps the slots \['a', 'b'\]"):
        ShadowStore(tracked(), slots=("a", "b")).get("w", "c")


def test_local_is_the_shard_of_a_dtensor(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tensor_api = pytest.importorskip("torch.distributed.tensor")
    DeviceMesh, Shard = tensor_api.DeviceMesh, tensor_api.Shard

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        param = tensor_api.distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh, [Shard(0)])
        shadows = ShadowStore([("p", param, "average")])
        shadow = shadows.get("p")
        assert type(shadow).__name__ == "DTensor" and shadow.placements == param.placements
        (kernel_view,) = shadows.slot_lists()[0]
        assert type(kernel_view) is torch.Tensor
        assert kernel_view.data_ptr() == shadow.to_local().data_ptr()  # the same storage
        kernel_view.add_(1.0)
        assert torch.equal(shadow.full_tensor(), torch.arange(1.0, 7.0).reshape(3, 2))
        plain = torch.zeros(2)
        assert local(plain) is plain
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU machine)")
def test_to_another_device_moves_and_keeps_the_objects():
    store = ShadowStore(tracked(), slots=("a", "b"))
    held, copy = store.get("w", "b"), store.get("n")
    store.to("cuda")
    assert store.get("w", "b") is held and held.is_cuda
    assert store.get("n") is copy and copy.is_cuda
