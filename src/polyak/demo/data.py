"""Data for the demo: scikit-learn's digits, CIFAR-10 from local files, and device-side batches.

Loaders return :class:`ImageData`: uint8 images in NHWC layout and uint8 labels, the layout of
the project's shared CIFAR-10 parts (``shared/data/README.md``) and of ``keras.datasets.cifar10.load_data()``. Nothing is
downloaded and nothing is unpickled. :class:`DeviceData` moves the arrays to the training device
once; normalisation and augmentation (random crop after 4-pixel zero padding, horizontal flip)
then run there on whole batches, with no per-image Python loop.

CIFAR-10 is read from any of three layouts (:func:`load_cifar10`):

* a directory of ``part-<i>.npz`` files, each with ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` (the four parts together are the full dataset);
* a single ``.npz`` file with the same four arrays;
* the official binary distribution, ``cifar-10-batches-bin/`` (``data_batch_1.bin`` ..
  ``data_batch_5.bin``, ``test_batch.bin``): records of one label byte and 3,072 pixel bytes,
  the 1,024 red, then green, then blue values of a 32x32 image in row-major order.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_URL",
    "DeviceData",
    "ImageData",
    "load_cifar10",
    "load_digits",
    "random_crop_flip",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_BINARY_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_BINARY_TEST = "test_batch.bin"
_RECORD = 1 + 3 * 32 * 32
_PART = re.compile(r"^part-(\d+)\.npz$")
_EXPECTED = (
    "Expected one of: a directory of part-<i>.npz files (each with uint8 arrays x_train "
    "(N, 32, 32, 3), y_train (N,), x_test (M, 32, 32, 3), y_test (M,)); a single .npz file with "
    "those four arrays; or the official binary version, the directory cifar-10-batches-bin "
    "(data_batch_1.bin .. data_batch_5.bin and test_batch.bin) or its parent. The official "
    f"files are published at {CIFAR10_URL} (take 'CIFAR-10 binary version (suitable for C "
    "programs)' and extract it with tar -xzf)."
)


@dataclass(frozen=True)
class ImageData:
    """A train/test split of images: uint8 NHWC arrays and uint8 labels in ``[0, classes)``.

    ``x_val``/``y_val``: a validation split held out of the training images
    (:meth:`with_validation`), or ``None`` (the default: every training image is trained on).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[1]), int(self.x_train.shape[2])

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and standard deviation of the training images, in [0, 1] units.

        Computed exactly from per-channel histograms of the uint8 values, with no float copy of
        the images.
        """
        levels = np.arange(256, dtype=np.float64)
        mean, std = [], []
        for c in range(self.channels):
            counts = np.bincount(self.x_train[..., c].ravel(), minlength=256).astype(np.float64)
            m = counts @ levels / counts.sum()
            v = counts @ (levels - m) ** 2 / counts.sum()
            mean.append(m / 255.0)
            std.append(np.sqrt(v) / 255.0)
        return np.array(mean), np.array(std)

    def with_validation(self, fraction: float, seed: int = 0) -> ImageData:
        """A copy whose training images are split into training and validation, by class.

        Of the ``n_c`` training images of class ``c``, ``round(fraction * n_c)`` (chosen by a
        permutation from ``np.random.default_rng(seed)``, drawn class by class in label order) go
        to ``x_val``/``y_val`` and the rest stay in ``x_train``/``y_train``, both in their
        original order. The test split is untouched. Deterministic: the same data, ``fraction``
        and ``seed`` give the same split on every machine. Digits with ``fraction=0.2``: 1,078
        training and 269 validation images (the 450 test images unchanged).

        Raises:
            ValueError: ``fraction`` is not in (0, 1), this data already has a validation split,
                or a split would be empty.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"fraction must be a float in (0, 1), got fraction={fraction!r}.")
        if not 0.0 < fraction < 1.0:
            raise ValueError(
                f"fraction must be in (0, 1), got fraction={fraction!r}; e.g. 0.2 holds out a "
                "fifth of the training images for validation."
            )
        if self.x_val is not None:
            raise ValueError(
                f"{self.name} already has a validation split ({len(self.x_val)} images); split "
                "the original data instead."
            )
        rng = np.random.default_rng(seed)
        held = np.zeros(len(self.y_train), dtype=bool)
        for label in np.unique(self.y_train):
            members = np.flatnonzero(self.y_train == label)
            count = round(fraction * len(members))
            held[rng.permutation(members)[:count]] = True
        if held.all() or not held.any():
            raise ValueError(
                f"fraction={fraction!r} of {len(held)} training images leaves an empty "
                f"{'training' if held.all() else 'validation'} split; choose a fraction nearer 0.5."
            )
        return dataclasses.replace(
            self,
            x_train=np.ascontiguousarray(self.x_train[~held]),
            y_train=self.y_train[~held],
            x_val=np.ascontiguousarray(self.x_train[held]),
            y_val=self.y_train[held],
        )


def load_digits(split_seed: int = 0, test_fraction: float = 0.25) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download) as :class:`ImageData`.

    Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) so every dataset has the
    same uint8 layout; images are ``(N, 8, 8, 1)``. The split is stratified by class and fixed by
    ``split_seed``: with the defaults 1,347 training and 450 test images.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    return ImageData(
        "digits",
        np.ascontiguousarray(x_train),
        y_train,
        np.ascontiguousarray(x_test),
        y_test,
        tuple(str(d) for d in range(10)),
    )


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"cannot read CIFAR-10 from {str(path)!r}: {problem}. {_EXPECTED}")


def _check_arrays(arrays: dict[str, np.ndarray], source: Path) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise _fail(
                source,
                f"x_{split} has shape {x.shape} and dtype {x.dtype}, not (N, 32, 32, 3) uint8",
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise _fail(
                source,
                f"y_{split} has shape {y.shape} and dtype {y.dtype}, not ({x.shape[0]},) integer "
                f"labels matching x_{split}",
            )
        if y.size and (y.min() < 0 or y.max() > 9):
            raise _fail(source, f"y_{split} has labels outside 0..9 ({y.min()}..{y.max()})")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = list(archive.files)
            arrays = {key: archive[key] for key in _ARRAYS if key in files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _fail(path, f"not a readable .npz archive ({error})") from error
    missing = [key for key in _ARRAYS if key not in arrays]
    if missing:
        raise _fail(path, f"the archive lacks {missing} (it has {sorted(files)})")
    _check_arrays(arrays, path)
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)
    arrays["y_test"] = arrays["y_test"].astype(np.uint8)
    return arrays


def _load_parts(directory: Path, parts: Sequence[int] | None) -> dict[str, np.ndarray]:
    found = {
        int(m.group(1)): directory / name
        for name in os.listdir(directory)
        if (m := _PART.match(name)) is not None
    }
    chosen = sorted(found) if parts is None else list(parts)
    unknown = [p for p in chosen if p not in found]
    if unknown:
        raise ValueError(
            f"CIFAR-10 parts {unknown} requested, but {str(directory)!r} holds parts "
            f"{sorted(found)}; pass --parts with some of those (e.g. --parts 0), or leave it out "
            "to use them all."
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"CIFAR-10 parts must not repeat, got parts={list(chosen)}.")
    loaded = [_load_npz(found[p]) for p in chosen]
    return {key: np.concatenate([arrays[key] for arrays in loaded]) for key in _ARRAYS}


def _read_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise _fail(
            path,
            f"{raw.size} bytes is not a whole number of {_RECORD}-byte records "
            "(1 label byte + 3,072 pixel bytes)",
        )
    records = raw.reshape(-1, _RECORD)
    labels = records[:, 0].copy()
    if labels.max() > 9:
        raise _fail(path, f"label byte {labels.max()} is outside 0..9 (not a CIFAR-10 batch?)")
    # Each record holds the red, green and blue planes (CHW); the demo uses HWC like the npz files.
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _is_binary_dir(directory: Path) -> bool:
    names = set(os.listdir(directory))
    return directory.name == "cifar-10-batches-bin" or bool(names & {*_BINARY_TRAIN, _BINARY_TEST})


def _load_binary(directory: Path) -> dict[str, np.ndarray]:
    missing = [n for n in (*_BINARY_TRAIN, _BINARY_TEST) if not (directory / n).is_file()]
    if missing:
        raise _fail(directory, f"the binary distribution lacks {missing}")
    train = [_read_binary(directory / name) for name in _BINARY_TRAIN]
    x_test, y_test = _read_binary(directory / _BINARY_TEST)
    return {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }


def load_cifar10(path: str | os.PathLike[str], parts: Sequence[int] | None = None) -> ImageData:
    """Read CIFAR-10 from ``path`` in any of the three layouts of this module's docstring.

    Args:
        path: a directory of ``part-<i>.npz`` files, a single ``.npz`` file, or the official
            ``cifar-10-batches-bin`` directory (or a directory containing it).
        parts: for the parts layout only, which parts to use (e.g. ``[0]`` for a quarter of the
            data, class-balanced); ``None`` uses every part found.

    Returns:
        :class:`ImageData` with ``(N, 32, 32, 3)`` uint8 images and ``(N,)`` uint8 labels.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is none of the layouts, a file is malformed, or ``parts`` names
            parts that are not there. Each message says what was expected and where the official
            files are published.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"CIFAR-10 path {str(root)!r} does not exist. {_EXPECTED}")
    if root.is_file():
        if parts is not None:
            raise ValueError(
                f"parts={list(parts)} applies to a directory of part-<i>.npz files, but "
                f"{str(root)!r} is a single file; leave parts (--parts) out."
            )
        arrays = _load_npz(root)
    elif any(_PART.match(name) for name in os.listdir(root)):
        arrays = _load_parts(root, parts)
    else:
        binary = root if _is_binary_dir(root) else root / "cifar-10-batches-bin"
        if not binary.is_dir():
            hint = (
                " (it looks like the Python version, whose pickles polyak never loads)"
                if (root / "data_batch_1").exists() or (root / "cifar-10-batches-py").exists()
                else ""
            )
            raise _fail(root, f"no part-<i>.npz files and no binary batches found{hint}")
        if parts is not None:
            raise ValueError(
                f"parts={list(parts)} applies to a directory of part-<i>.npz files, but "
                f"{str(binary)!r} is the binary distribution; leave parts (--parts) out."
            )
        arrays = _load_binary(binary)
    return ImageData("cifar10", *(arrays[key] for key in _ARRAYS), classes=CIFAR10_CLASSES)


def random_crop_flip(
    images: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crops after zero padding, and random horizontal flips, for a whole NCHW batch.

    Each image is padded by ``padding`` pixels of value 0 on every side and cropped back to its
    size at an offset drawn uniformly from ``{0, ..., 2 * padding}`` in each direction, then
    mirrored left-right with probability 1/2 if ``flip``. One gather on the images' device, no
    per-image loop; any dtype. ``generator`` must live on the images' device.
    """
    n, c, h, w = images.shape
    device = images.device
    if padding:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
        rows = (dy + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flip:
        mirror = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


class DeviceData:
    """An :class:`ImageData` on the training device, serving normalised float32 batches.

    Images are stored once as uint8 NCHW (channels_last strides when ``channels_last``);
    a batch is gathered by index, augmented as uint8 (:func:`random_crop_flip`), then normalised
    as ``(x / 255 - mean) / std`` with the training set's per-channel statistics (a std below
    one grey level, 1/255, counts as 1/255).

    Args:
        data: the dataset.
        device: where the tensors live and the batches are made.
        padding, flip: the training augmentation (0 and False: none).
        channels_last: serve batches in ``torch.channels_last`` memory format (GPU convolutions).
    """

    def __init__(
        self,
        data: ImageData,
        device: torch.device | str,
        padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.padding = padding
        self.flip = flip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

        def images(array: np.ndarray) -> torch.Tensor:
            nchw = torch.from_numpy(array).to(self.device).permute(0, 3, 1, 2)
            return nchw.contiguous(memory_format=self.memory_format)

        def labels(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array.astype(np.int64)).to(self.device)

        self.x_train, self.y_train = images(data.x_train), labels(data.y_train)
        self.x_test, self.y_test = images(data.x_test), labels(data.y_test)
        self.x_val = None if data.x_val is None else images(data.x_val)
        self.y_val = None if data.y_val is None else labels(data.y_val)
        mean, std = data.channel_stats()
        shape = (1, data.channels, 1, 1)
        self._shift = torch.tensor(mean * 255.0, dtype=torch.float32, device=self.device).view(
            shape
        )
        # A constant channel (std 0) is scaled as if its std were one grey level, not by 1/0.
        self._scale = torch.tensor(
            1.0 / np.maximum(std * 255.0, 1.0), dtype=torch.float32, device=self.device
        ).view(shape)

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW images -> float32 ``(x / 255 - mean) / std`` in this data's memory format."""
        out = (images.float() - self._shift) * self._scale
        return out.contiguous(memory_format=self.memory_format)

    def train_batch(
        self, index: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, normalised training images at ``index`` and their labels."""
        images = self.x_train[index]
        if self.padding or self.flip:
            images = random_crop_flip(images, self.padding, self.flip, generator)
        return self.normalize(images), self.y_train[index]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test set in order, as normalised ``(images, labels)`` batches (no augmentation)."""
        return self.batches("test", batch_size)

    def batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``split`` ("test" or "val") in order, as normalised ``(images, labels)`` batches."""
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got split={split!r}.")
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        if x is None or y is None:
            raise ValueError(
                "this data has no validation split; build it from "
                "ImageData.with_validation(fraction) (polyak demo --val-fraction)."
            )
        for i in range(0, int(x.shape[0]), batch_size):
            yield self.normalize(x[i : i + batch_size]), y[i : i + batch_size]
