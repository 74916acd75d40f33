"""One flat float64 vector for a whole model, and the layout to undo it.

Why one vector: CKKS cost is per ciphertext (N/2 slots each), so packing every layer end to end
fills all slots but the last ciphertext's tail. FLARE's HE encrypts layer by layer, so each small
tensor (a 16-value bias, a norm scale) pays for a whole ciphertext.

Layers are packed in *sorted name order*, not the dict's order: the server adds slot i of every
site's vector, so all sites must agree on what slot i is, and two sites building the same model
may still insert layers in different orders. The layout travels in the clear next to the
ciphertexts: it reveals the architecture (names, shapes, dtypes), never a value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from math import prod

import numpy as np

_LAYOUT_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """Ordered names, shapes and dtypes of the arrays packed into one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise ValueError("layout names, shapes and dtypes differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("layout names are not unique")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(prod(shape) for shape in self.shapes)

    @property
    def size(self) -> int:
        """Total number of values: the length of the flat vector."""
        return sum(self.sizes)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """name → (start, stop) in the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.sizes, strict=True):
            out[name] = (start, start + n)
            start += n
        return out

    def locate(self, index: int) -> str:
        """The layer that holds flat position ``index`` (for error messages)."""
        for name, (start, stop) in self.offsets().items():
            if start <= index < stop:
                return name
        raise IndexError(index)


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Concatenate numeric arrays (sorted by name) into one float64 vector and its layout.

    float64, not float32: CKKS encodes doubles, and weighting before encryption should not round
    twice.
    """
    names = tuple(sorted(arrays))
    parts, shapes, dtypes = [], [], []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be str, got {type(name).__name__}")
        arr = np.asarray(arrays[name])
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"layer '{name}' has dtype {arr.dtype}; only real numbers can be aggregated")
        parts.append(arr.astype(np.float64, copy=False).reshape(-1))
        shapes.append(tuple(int(d) for d in arr.shape))
        dtypes.append(arr.dtype.str)
    vec = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    return vec, Layout(names, tuple(shapes), tuple(dtypes))


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout :func:`flatten` would return, without building the flat vector."""
    names = tuple(sorted(arrays))
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be str, got {type(name).__name__}")
        dtype = np.asarray(arrays[name]).dtype
        if dtype.kind not in "fiu":
            raise ValueError(f"layer '{name}' has dtype {dtype}; only real numbers can be aggregated")
    return Layout(
        names,
        tuple(tuple(int(d) for d in np.shape(arrays[n])) for n in names),
        tuple(np.asarray(arrays[n]).dtype.str for n in names),
    )


def rechunk(pieces: Iterable[np.ndarray], size: int, dtype: np.dtype | type = np.float64) -> Iterator[np.ndarray]:
    """Consecutive 1-D ``pieces`` regrouped into arrays of exactly ``size`` values (the last may be
    shorter), each a fresh array of ``dtype``: at most one group is held besides the pieces."""
    if size < 1:
        raise ValueError(f"chunk size must be positive, got {size}")
    buf, fill = np.empty(size, dtype=dtype), 0
    for piece in pieces:
        flat, pos = np.asarray(piece).reshape(-1), 0
        while pos < flat.size:
            take = min(size - fill, flat.size - pos)
            buf[fill : fill + take] = flat[pos : pos + take]
            fill, pos = fill + take, pos + take
            if fill == size:
                yield buf
                buf, fill = np.empty(size, dtype=dtype), 0
    if fill:
        yield buf[:fill]


def iter_flat(
    arrays: Mapping[str, np.ndarray], layout: Layout, chunk: int, head: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """The flat float64 vector of ``arrays`` in pieces of ``chunk`` values (the last may be shorter),
    so a 500 MB model is never doubled into one float64 copy: at most one chunk is extra. ``head``
    (e.g. a slot for a contributor count) comes before the model's first value."""
    pieces = (arrays[name] for name in layout.names)
    return rechunk(pieces if head is None else chain([head], pieces), chunk, np.float64)


class FlatWriter:
    """The inverse of :func:`iter_flat`: consecutive pieces of the flat vector written straight into
    arrays of the layout's shapes and dtypes (integer layers rounded), one piece at a time."""

    def __init__(self, layout: Layout):
        self.layout = layout
        parts = zip(layout.names, layout.shapes, layout.dtypes, strict=True)
        self.arrays = {n: np.empty(shape, dtype=np.dtype(d)) for n, shape, d in parts}
        self._flat = [self.arrays[n].reshape(-1) for n in layout.names]
        self._layer, self._pos, self.written = 0, 0, 0

    def write(self, piece: np.ndarray) -> None:
        piece = np.asarray(piece).reshape(-1)
        if self.written + piece.size > self.layout.size:
            raise ValueError(f"{self.written + piece.size} values written, layout holds {self.layout.size}")
        done = 0
        while done < piece.size:
            target = self._flat[self._layer]
            take = min(target.size - self._pos, piece.size - done)
            part = piece[done : done + take]
            target[self._pos : self._pos + take] = np.rint(part) if target.dtype.kind in "iu" else part
            done, self._pos = done + take, self._pos + take
            if self._pos == target.size:
                self._layer, self._pos = self._layer + 1, 0
        self.written += piece.size
        while self._layer < len(self._flat) and self._flat[self._layer].size == 0:  # empty layers
            self._layer += 1

    def result(self) -> dict[str, np.ndarray]:
        if self.written != self.layout.size:
            raise ValueError(f"vector has {self.written} values, layout expects {self.layout.size}")
        return self.arrays


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays of the layout's shapes and dtypes.

    Integer layers (e.g. a step counter) are rounded, not truncated, on the way back.
    """
    flat = np.asarray(vec).reshape(-1)
    if flat.size != layout.size:
        raise ValueError(f"vector has {flat.size} values, layout expects {layout.size}")
    out: dict[str, np.ndarray] = {}
    for (name, (start, stop)), shape, dtype in zip(layout.offsets().items(), layout.shapes, layout.dtypes, strict=True):
        piece = flat[start:stop].reshape(shape)
        target = np.dtype(dtype)
        if target.kind in "iu":
            piece = np.rint(piece)
        out[name] = piece.astype(target)
    return out


def layout_to_json(layout: Layout) -> str:
    return json.dumps(
        {
            "version": _LAYOUT_VERSION,
            "names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes],
            "dtypes": list(layout.dtypes),
        },
        separators=(",", ":"),
    )


def layout_from_json(text: str) -> Layout:
    """Parse a layout sent by a peer; malformed input raises ValueError (never a KeyError deep inside)."""
    try:
        obj = json.loads(text)
        if obj.get("version") != _LAYOUT_VERSION:
            raise ValueError(f"unsupported layout version {obj.get('version')!r}")
        names = tuple(str(n) for n in obj["names"])
        shapes = tuple(tuple(int(d) for d in s) for s in obj["shapes"])
        dtypes = tuple(np.dtype(d).str for d in obj["dtypes"])
    except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed layout: {exc}") from exc
    if any(d < 0 for s in shapes for d in s):
        raise ValueError("malformed layout: negative dimension")
    return Layout(names, shapes, dtypes)
