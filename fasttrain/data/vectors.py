"""Regression targets as one array: the compact stand-in for a split's list of float lists.

A list of K floats per sample costs ~216 bytes at K = 5 (the list, a pointer and a float object per value);
:class:`Vectors` holds the N x K array (8 or 4 bytes a value) and behaves like the list it stands for, as
:class:`~fasttrain.data.index.IndexedPaths` does for paths: length, indexing (a ``list[float]`` made on access),
slicing, ``take`` (what ``Split.subset`` asks for), iteration and ``==`` against a list. ``np.asarray`` (and
:func:`~fasttrain.data.samples.targets_tensor`) read the array itself, without a list per sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

__all__ = ["Vectors"]


class Vectors(Sequence[list[float]]):
    """N target vectors of K floats as one N x K array (see the module docstring)."""

    def __init__(self, array: Any):
        arr = np.asarray(array)
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise ValueError(f"Vectors: an N x K float array is needed, got shape {arr.shape} of {arr.dtype}")
        self.array = arr

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> list[float]: ...
    @overload
    def __getitem__(self, i: slice) -> Vectors: ...
    def __getitem__(self, i: int | slice) -> list[float] | Vectors:
        if isinstance(i, slice):
            return Vectors(self.array[i])
        return self.array[i].tolist()

    def __iter__(self) -> Iterator[list[float]]:
        for row in self.array:
            yield row.tolist()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.array if dtype is None else self.array.astype(dtype, copy=False)
        return arr.copy() if copy else arr

    def take(self, indices: Sequence[int]) -> Vectors:
        """The rows at ``indices``, as one array."""
        return Vectors(self.array[np.asarray(indices, dtype=np.int64)])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Vectors):
            return self.array.shape == other.array.shape and bool((self.array == other.array).all())
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Vectors({len(self)} x {self.array.shape[1]} {self.array.dtype})"
