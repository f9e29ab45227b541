"""polyak.demo.data: the three CIFAR-10 layouts, digits, and device-side augmentation."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from polyak.demo.data import (
    CIFAR10_URL,
    DeviceData,
    ImageData,
    load_cifar10,
    load_digits,
    random_crop_flip,
)

# the project's shared data sits beside the checkout (../shared), in CI as here
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"
needs_shared = pytest.mark.skipif(
    not (SHARED / "part-0.npz").exists(), reason="the shared CIFAR-10 parts are not on this machine"
)


def _fake(n_train: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def _write_binary(directory: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The official binary layout: per record, 1 label byte then the R, G and B planes."""
    directory.mkdir(parents=True)

    def records(x: np.ndarray, y: np.ndarray) -> bytes:
        planes = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # HWC -> CHW, flattened
        return np.concatenate([y[:, None], planes], axis=1).astype(np.uint8).tobytes()

    chunks = np.array_split(np.arange(len(arrays["y_train"])), 5)
    for i, idx in enumerate(chunks, start=1):
        (directory / f"data_batch_{i}.bin").write_bytes(
            records(arrays["x_train"][idx], arrays["y_train"][idx])
        )
    (directory / "test_batch.bin").write_bytes(records(arrays["x_test"], arrays["y_test"]))
    return directory


def _assert_same(data: ImageData, arrays: dict[str, np.ndarray]) -> None:
    for key in ("x_train", "y_train", "x_test", "y_test"):
        got = getattr(data, key)
        assert got.dtype == np.uint8, key
        np.testing.assert_array_equal(got, arrays[key], err_msg=key)
    assert data.x_train.flags.c_contiguous


def test_single_npz(tmp_path: Path) -> None:
    arrays = _fake(20, 6)
    np.savez(tmp_path / "cifar.npz", **arrays)
    data = load_cifar10(tmp_path / "cifar.npz")
    _assert_same(data, arrays)
    assert (data.name, data.num_classes, data.channels, data.image_size) == (
        "cifar10",
        10,
        3,
        (32, 32),
    )


def test_single_npz_with_wider_label_dtype(tmp_path: Path) -> None:
    arrays = _fake(4, 2)
    np.savez(tmp_path / "c.npz", **{**arrays, "y_train": arrays["y_train"].astype(np.int64)})
    assert load_cifar10(tmp_path / "c.npz").y_train.dtype == np.uint8


def test_parts_directory_and_part_selection(tmp_path: Path) -> None:
    parts = [_fake(8, 3, seed=i) for i in range(3)]
    for i, arrays in enumerate(parts):
        np.savez_compressed(tmp_path / f"part-{i}.npz", **arrays)
    union = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _assert_same(load_cifar10(tmp_path), union)
    _assert_same(load_cifar10(tmp_path, parts=[1]), parts[1])
    _assert_same(
        load_cifar10(tmp_path, parts=[2, 0]),
        {k: np.concatenate([parts[2][k], parts[0][k]]) for k in union},
    )
    with pytest.raises(
        ValueError, match=re.escape("parts [5] requested, but") + ".*holds parts \\[0, 1, 2\\]"
    ):
        load_cifar10(tmp_path, parts=[5])


@pytest.mark.parametrize("nested", [False, True], ids=["batches-dir", "parent-dir"])
def test_official_binary_layout(tmp_path: Path, nested: bool) -> None:
    arrays = _fake(25, 7)
    _write_binary(tmp_path / "cifar-10-batches-bin", arrays)
    data = load_cifar10(tmp_path if nested else tmp_path / "cifar-10-batches-bin")
    _assert_same(data, arrays)


def test_binary_pixel_order_is_rgb_planes(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-bin"
    directory.mkdir()
    record = np.zeros(3073, dtype=np.uint8)
    record[0] = 7
    record[1 : 1 + 1024] = 200  # red plane
    record[1 + 1024 + 33] = 99  # green plane, row 1, column 1
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (directory / name).write_bytes(record.tobytes())
    data = load_cifar10(directory)
    assert data.x_train.shape == (5, 32, 32, 3) and data.y_train.tolist() == [7] * 5
    assert data.x_test[0, 0, 0].tolist() == [200, 0, 0]
    assert data.x_test[0, 1, 1].tolist() == [200, 99, 0]


def test_missing_path_error_says_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "does not exist" in message
    assert "part-<i>.npz" in message and "cifar-10-batches-bin" in message
    assert CIFAR10_URL in message


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.write_bytes(b"not a zip at all"), "not a readable .npz archive"),
        (
            lambda p: np.savez(p, x_train=np.zeros((2, 32, 32, 3), np.uint8)),
            "the archive lacks ['y_train', 'x_test', 'y_test']",
        ),
        (
            lambda p: np.savez(p, **{**_fake(3, 2), "x_train": np.zeros((3, 28, 28), np.uint8)}),
            "x_train has shape (3, 28, 28) and dtype uint8, not (N, 32, 32, 3) uint8",
        ),
        (
            lambda p: np.savez(p, **{**_fake(3, 2), "y_test": np.zeros(5, np.uint8)}),
            "y_test has shape (5,) and dtype uint8, not (2,) integer labels",
        ),
        (
            lambda p: np.savez(p, **{**_fake(3, 2), "y_train": np.array([0, 3, 12], np.uint8)}),
            "y_train has labels outside 0..9 (0..12)",
        ),
    ],
    ids=["not-zip", "missing-arrays", "bad-shape", "label-count", "label-range"],
)
def test_malformed_npz_errors(tmp_path: Path, make, problem: str) -> None:
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(ValueError) as info:
        load_cifar10(path)
    message = str(info.value)
    assert problem in message
    assert message.startswith(f"cannot read CIFAR-10 from {str(path)!r}")
    assert CIFAR10_URL in message


def test_malformed_binary_errors(tmp_path: Path) -> None:
    directory = _write_binary(tmp_path / "cifar-10-batches-bin", _fake(10, 2))
    (directory / "test_batch.bin").write_bytes(b"\x00" * 3072)  # one byte short of a record
    with pytest.raises(
        ValueError, match=re.escape("3072 bytes is not a whole number of 3073-byte records")
    ):
        load_cifar10(directory)
    (directory / "test_batch.bin").unlink()
    with pytest.raises(
        ValueError, match=re.escape("the binary distribution lacks ['test_batch.bin']")
    ):
        load_cifar10(directory)


def test_directory_without_any_layout_and_pickle_hint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no part-<i>.npz files and no binary batches found"):
        load_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(
        ValueError,
        match=re.escape("(it looks like the Python version, whose pickles polyak never loads)"),
    ):
        load_cifar10(tmp_path)


def test_parts_rejected_for_single_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", **_fake(2, 2))
    with pytest.raises(ValueError, match="single file; leave parts"):
        load_cifar10(tmp_path / "c.npz", parts=[0])


@needs_shared
def test_shared_parts_union_is_the_full_dataset() -> None:
    data = load_cifar10(SHARED)
    assert data.x_train.shape == (50_000, 32, 32, 3) and data.x_test.shape == (10_000, 32, 32, 3)
    assert data.y_train.shape == (50_000,) and data.y_test.shape == (10_000,)
    assert {a.dtype for a in (data.x_train, data.y_train, data.x_test, data.y_test)} == {
        np.dtype(np.uint8)
    }
    assert np.bincount(data.y_train).tolist() == [5000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    mean, std = data.channel_stats()  # the widely quoted CIFAR-10 training statistics
    np.testing.assert_allclose(mean, [0.4914, 0.4822, 0.4465], atol=1e-4)
    np.testing.assert_allclose(std, [0.2470, 0.2435, 0.2616], atol=1e-4)


@needs_shared
def test_shared_single_part(tmp_path: Path) -> None:
    shutil.copy(SHARED / "part-0.npz", tmp_path / "part-0.npz")
    data = load_cifar10(tmp_path, parts=[0])
    assert data.x_train.shape == (12_500, 32, 32, 3) and data.x_test.shape == (2_500, 32, 32, 3)
    assert np.bincount(data.y_train).tolist() == [1250] * 10
    assert np.bincount(data.y_test).tolist() == [250] * 10


def test_digits_split_is_fixed_and_stratified() -> None:
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1347, 8, 8, 1) and a.x_test.shape == (450, 8, 8, 1)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.uint8
    assert a.x_train.max() == 255 and a.x_train.min() == 0
    np.testing.assert_array_equal(a.x_test, b.x_test)
    labels = np.concatenate([a.y_train, a.y_test])
    share = np.bincount(labels, minlength=10) / len(labels)
    counts = np.bincount(a.y_test, minlength=10)
    assert np.abs(counts - 450 * share).max() <= 1  # stratified by class
    assert not np.array_equal(load_digits(split_seed=1).y_test, a.y_test)


def test_channel_stats_match_float_computation() -> None:
    data = ImageData("t", *_fake(50, 2).values(), classes=tuple("0123456789"))
    mean, std = data.channel_stats()
    x = data.x_train.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std((0, 1, 2)), rtol=1e-12)


# ---------------------------------------------------------------- augmentation on tensors


def _reference_crop_flip(images: torch.Tensor, padding: int, dy, dx, mirror) -> torch.Tensor:
    """A per-image loop: pad with zeros, crop at (dy, dx), flip."""
    out = []
    h, w = images.shape[2:]
    for i, image in enumerate(images):
        padded = torch.nn.functional.pad(image, (padding,) * 4)
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out.append(crop.flip(2) if mirror[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_a_per_image_loop(dtype: torch.dtype) -> None:
    images = torch.randint(1, 256, (64, 3, 6, 5)).to(dtype)
    out = random_crop_flip(images, 2, True, torch.Generator().manual_seed(3))
    # Replay the same draws: dy, dx, then the flip coins.
    gen = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 5, (64, 1), generator=gen)[:, 0].tolist()
    dx = torch.randint(0, 5, (64, 1), generator=gen)[:, 0].tolist()
    mirror = (torch.rand(64, generator=gen) < 0.5).tolist()
    assert out.dtype == dtype and out.shape == images.shape
    torch.testing.assert_close(out, _reference_crop_flip(images, 2, dy, dx, mirror), rtol=0, atol=0)
    assert len(set(dy)) == 5 and len(set(dx)) == 5 and 0 < sum(mirror) < 64  # draws do vary
    assert (out == 0).any()  # some zero padding shows


def test_no_augmentation_is_identity() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(images, 0, False), images)


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_data_batches(channels_last: bool) -> None:
    data = load_digits()
    device_data = DeviceData(data, "cpu", padding=1, flip=False, channels_last=channels_last)
    assert device_data.x_train.dtype == torch.uint8 and device_data.x_train.shape == (1347, 1, 8, 8)
    images, labels = device_data.train_batch(torch.arange(1347))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    plain = DeviceData(data, "cpu")
    x, _ = plain.train_batch(torch.arange(1347))
    torch.testing.assert_close(x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
    test = list(plain.test_batches(100))
    assert [len(y) for _, y in test] == [100] * 4 + [50]
    assert torch.equal(
        torch.cat([y for _, y in test]), torch.from_numpy(data.y_test.astype(np.int64))
    )


# ---------------------------------------------------------------- the validation split


def _rows(x: np.ndarray) -> list[bytes]:
    return [image.tobytes() for image in x]


def test_validation_split_partitions_the_training_images_by_class() -> None:
    data = load_digits()
    split = data.with_validation(0.2)
    assert split.x_val is not None and split.y_val is not None
    assert (len(split.y_train), len(split.y_val)) == (1078, 269)
    for label in range(10):  # round(0.2 * n_c) of each class, counted independently
        n = int((data.y_train == label).sum())
        assert int((split.y_val == label).sum()) == int(np.floor(0.2 * n + 0.5))
    # train + val is the original training set (each image once, with its label), in order
    original = list(zip(_rows(data.x_train), data.y_train.tolist(), strict=True))
    train = list(zip(_rows(split.x_train), split.y_train.tolist(), strict=True))
    val = list(zip(_rows(split.x_val), split.y_val.tolist(), strict=True))
    assert sorted(train + val) == sorted(original)
    assert train == [pair for pair in original if pair in set(train)]  # order kept
    # the test split is untouched and shares no image with validation
    np.testing.assert_array_equal(split.x_test, data.x_test)
    np.testing.assert_array_equal(split.y_test, data.y_test)
    assert not set(_rows(split.x_val)) & set(_rows(data.x_test))
    assert split.x_train.flags.c_contiguous and split.x_val.flags.c_contiguous


def test_validation_split_is_fixed_by_its_seed() -> None:
    data = load_digits()
    a, b = data.with_validation(0.2), load_digits().with_validation(0.2)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    other = data.with_validation(0.2, seed=1)
    assert not np.array_equal(other.x_val, a.x_val)


@pytest.mark.parametrize(
    ("fraction", "error", "message"),
    [
        (0.0, ValueError, "fraction must be in (0, 1), got fraction=0.0"),
        (1.0, ValueError, "fraction must be in (0, 1), got fraction=1.0"),
        (-0.1, ValueError, "fraction must be in (0, 1)"),
        ("0.2", TypeError, "fraction must be a float in (0, 1), got fraction='0.2'"),
        (0.01, ValueError, "leaves an empty validation split"),
        (0.99, ValueError, "leaves an empty training split"),
    ],
)
def test_validation_split_errors(fraction: object, error: type, message: str) -> None:
    data = ImageData("t", *_fake(20, 4).values(), classes=tuple("0123456789"))
    with pytest.raises(error) as info:
        data.with_validation(fraction)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_validation_split_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already has a validation split"):
        load_digits().with_validation(0.2).with_validation(0.2)


def test_device_data_serves_the_validation_split() -> None:
    split = load_digits().with_validation(0.2)
    data = DeviceData(split, "cpu")
    batches = list(data.batches("val", 100))
    assert [len(y) for _, y in batches] == [100, 100, 69]
    assert torch.equal(
        torch.cat([y for _, y in batches]), torch.from_numpy(split.y_val.astype(np.int64))
    )
    x = torch.cat([x for x, _ in batches])
    torch.testing.assert_close(x, data.normalize(data.x_val), rtol=0, atol=0)
    with pytest.raises(ValueError, match="this data has no validation split"):
        next(DeviceData(load_digits(), "cpu").batches("val", 100))
    with pytest.raises(ValueError, match="split must be 'test' or 'val', got split='train'"):
        next(data.batches("train", 100))
