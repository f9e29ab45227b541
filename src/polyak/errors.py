"""The exceptions polyak raises on purpose, in one small hierarchy.

Each one also subclasses the builtin exception that the same code raised before it existed, so an
``except ValueError`` written against an older polyak still catches it::

    PolyakError                               everything below; catch this to catch them all
    ├── CorruptFileError(ValueError)          a file that is not what polyak wrote, or is damaged:
    │   └── ChecksumError                     truncated, bytes flipped, not safetensors, a pickle
    ├── VersionError(ValueError)              a state of a version this polyak does not know
    ├── StateMismatchError(ValueError)        a state dict that does not fit the EMA loading it
    ├── ModelChangedError(RuntimeError)       the model no longer holds what the EMA averages
    └── NonFiniteError(FloatingPointError)    NaN or Inf reached an update (``nonfinite="raise"``)

Loading a file (:func:`polyak.io.load`, :meth:`polyak.EMA.load_state`) raises only
``CorruptFileError``, ``VersionError``, ``StateMismatchError`` or ``OSError`` (a file that cannot be
read at all), whatever the bytes are: see ``SECURITY.md``.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "CorruptFileError",
    "ModelChangedError",
    "NonFiniteError",
    "PolyakError",
    "StateMismatchError",
    "VersionError",
]


class PolyakError(Exception):
    """Base of every exception polyak raises on purpose."""


class CorruptFileError(PolyakError, ValueError):
    """A file is not one polyak wrote, or it was damaged after writing (truncated, bytes changed,
    a pickle where safetensors was expected). The message names the file and what is wrong."""


class ChecksumError(CorruptFileError):
    """A polyak state file whose contents do not match the checksum written with them: the file
    was changed or damaged after it was written."""


class VersionError(PolyakError, ValueError):
    """A state (file or dict) of a format version this polyak does not know: newer than it (upgrade
    polyak), or no version polyak ever wrote."""


class StateMismatchError(PolyakError, ValueError):
    """A well-formed state dict that does not fit the EMA that loads it (other names, shapes,
    dtypes, rule or buffer policy). Nothing was changed."""


class ModelChangedError(PolyakError, RuntimeError):
    """The model stopped holding the tensors an EMA averages in a way it cannot follow (a removed
    or reshaped tensor, a tensor on another device). Nothing was changed."""


class NonFiniteError(PolyakError, FloatingPointError):
    """An update met NaN or Inf in the tracked tensors under ``nonfinite="raise"``; raised at the
    next point that reads the averages. ``names``: the tensors that held them at that update;
    ``step``: the update's :attr:`polyak.EMA.step` (``None`` under ``nonfinite="detect"``, which
    finds the NaN/Inf in the averages, not at an update)."""

    def __init__(self, message: str, *, names: list[str], step: int | None) -> None:
        super().__init__(message)
        self.names = names
        self.step = step
