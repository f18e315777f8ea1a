"""Region spec grammar: a string -> sorted, unique, 0-based decoder-layer indices.

Pure Python on purpose (no torch import), so that ``vr-plugin select`` and the
argument parsers stay instant.

Accepted forms (``L`` = number of decoder layers, ``<n>`` = size, see below):

``uniform_<n>``
    ``n`` layers spread sparsely and uniformly over the whole depth.
    Construction: put ``n`` evenly spaced points on ``[1, L-1]`` (both ends
    included), then round each point *away from the middle* ``L/2`` (floor
    below it, ceil above it).  The result is mirror-symmetric (``i`` selected
    <=> ``L-i`` selected), always contains the last layer, and for
    ``uniform_0.25`` on 32 layers gives ``1,5,9,13,19,23,27,31``: the official
    code's default.  ``n == 1`` gives the middle layer ``L//2``; ``n == L``
    gives every layer.
``first_<n>``, ``last_<n>``, ``middle_<n>``
    a contiguous block at the bottom, the top, or centred (start ``(L-n)//2``).
``random_<n>`` / ``random_<n>_seed<s>``
    ``n`` layers drawn without replacement by ``random.Random(s)`` (s = 0 by
    default); deterministic.
``all`` / ``none``
    every layer / no layer (projector-only tuning).
``1,5,9``, ``1::4``, ``0:16:2``, ``0:4,8,12``, ``-1``
    explicit indices and Python slices over ``range(L)``, comma-separated;
    negative values count from the end as in Python.

Size ``<n>``: a fraction with a decimal point (``0.25``, ``.5``, ``1.0``) or a
percentage (``25%``) means ``k = max(1, floor(r * L + 0.5))`` layers (round
half up), with ``0 < r <= 1``; a plain integer (``8``) is a layer count
``1 <= k <= L``.  So ``uniform_1`` is one layer and ``uniform_1.0`` is all.
"""

from __future__ import annotations

import math
import operator
import random
import re
from collections.abc import Iterable

__all__ = ["ACCEPTED_FORMS", "DEFAULT_SPEC", "select_layers", "region_size", "describe_indices"]

DEFAULT_SPEC = "uniform_0.25"  # the paper's visual region: a quarter of the layers, spread uniformly

ACCEPTED_FORMS = (
    "uniform_<n>, first_<n>, last_<n>, middle_<n>, random_<n>[_seed<s>], all, none, "
    "an index list like '1,5,9', or Python slices like '1::4' / '0:16:2' "
    "(<n>: a fraction with a decimal point like 0.25, a percentage like 25%, or a layer count like 8)"
)

_STRATEGY = re.compile(r"^(uniform|first|last|middle|random)_([^_]+)(?:_seed(-?\d+))?$")
_FRACTION = re.compile(r"^(\d+\.\d*|\.\d+)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?)%$")
_COUNT = re.compile(r"^\d+$")
_INT = re.compile(r"^[+-]?\d+$")


def _error(spec: object, num_layers: int, why: str) -> ValueError:
    return ValueError(
        f"Invalid visual region {spec!r} for a model with {num_layers} decoder layers: {why}. "
        f"Accepted forms: {ACCEPTED_FORMS}."
    )


def region_size(size: str, num_layers: int, *, spec: object = None) -> int:
    """Number of layers ``k`` that a size token (``0.25``, ``25%``, ``8``) means for ``num_layers``."""
    spec = size if spec is None else spec
    size = size.strip()
    if _COUNT.match(size):
        k = int(size)
        if not 1 <= k <= num_layers:
            raise _error(spec, num_layers, f"the layer count {k} is outside 1..{num_layers}")
        return k
    match_pct = _PERCENT.match(size)
    if match_pct or _FRACTION.match(size):
        r = float(match_pct.group(1)) / 100.0 if match_pct else float(size)
        if not 0.0 < r <= 1.0:
            raise _error(spec, num_layers, f"the fraction {size} is not in (0, 1]")
        return max(1, math.floor(r * num_layers + 0.5))
    raise _error(spec, num_layers, f"{size!r} is neither a fraction (0.25), a percentage (25%) nor a layer count (8)")


def _uniform(k: int, num_layers: int) -> list[int]:
    """``k`` evenly spaced points on [1, L-1], rounded away from the middle ``L/2``."""
    if k >= num_layers:
        return list(range(num_layers))
    if k == 1:
        return [num_layers // 2]
    # Point i is 1 + i*(L-2)/(k-1) = num/den; integer arithmetic keeps the
    # comparison with the middle L/2 exact (no float ties).
    den = k - 1
    out = []
    for i in range(k):
        num = i * (num_layers - 2) + den
        if 2 * num < num_layers * den:
            out.append(num // den)  # below the middle: round down
        elif 2 * num > num_layers * den:
            out.append(-(-num // den))  # above the middle: round up
        else:
            out.append(num_layers // 2)  # exactly the middle (L even)
    return out


def _parse_index_list(spec: str, num_layers: int) -> list[int]:
    picked: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise _error(spec, num_layers, "it contains an empty item")
        if ":" in item:
            parts = [p.strip() for p in item.split(":")]
            if len(parts) > 3 or not all(p == "" or _INT.match(p) for p in parts):
                raise _error(spec, num_layers, f"{item!r} is not a slice of integers like '1::4' or '0:16:2'")
            start, stop, step = ([int(p) if p else None for p in parts] + [None])[:3]
            if step == 0:
                raise _error(spec, num_layers, f"the slice {item!r} has step 0")
            for bound in (start, stop):
                if bound is not None and not -num_layers <= bound <= num_layers:
                    raise _error(spec, num_layers, f"the slice bound {bound} in {item!r} is out of range")
            chosen = list(range(num_layers))[slice(start, stop, step)]
            if not chosen:
                raise _error(spec, num_layers, f"the slice {item!r} selects no layer")
            picked.extend(chosen)
        elif _INT.match(item):
            index = int(item)
            if not -num_layers <= index < num_layers:
                raise _error(spec, num_layers, f"layer {index} is out of range 0..{num_layers - 1}")
            picked.append(index % num_layers)
        else:
            raise _error(spec, num_layers, f"{item!r} is not a layer index, a slice or a known strategy")
    duplicates = sorted({i for i in picked if picked.count(i) > 1})
    if duplicates:
        raise _error(spec, num_layers, f"layers {duplicates} are given more than once")
    return sorted(picked)


def _as_index(value: object) -> int | None:
    """``value`` as a Python int when it is an integer (``int``, ``numpy.int64``, a 0-d integer torch tensor: anything
    with ``__index__``) other than a bool, else None."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_num_layers(num_layers: object) -> int:
    """``num_layers`` as a positive Python int (``numpy`` / 0-d torch integers too); ``ValueError`` otherwise."""
    count = _as_index(num_layers)
    if count is None or count < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    return count


def _select_from_list(spec: Iterable[int], num_layers: int) -> list[int]:
    """An iterable of integer indices (anything with ``__index__`` but ``bool``) checked against the depth."""
    try:
        items = list(spec)
    except TypeError:
        raise _error(spec, num_layers, "it is neither a string nor a list of integers") from None
    indices = [_as_index(i) for i in items]
    if any(i is None for i in indices):
        bad = next(i for i, index in zip(items, indices) if index is None)
        raise _error(spec, num_layers, f"a list spec must contain integers only, got {bad!r}")
    if not items:
        raise _error(spec, num_layers, "the list is empty (use 'none' for projector-only tuning)")
    return _parse_index_list(",".join(str(i) for i in indices), num_layers)


def _select_strategy(spec: str, strategy: str, size: str, seed: str | None, num_layers: int) -> list[int]:
    """``uniform_`` / ``first_`` / ``last_`` / ``middle_`` / ``random_<n>[_seed<s>]``."""
    if seed is not None and strategy != "random":
        raise _error(spec, num_layers, "only random_<n> takes a _seed<s> suffix")
    k = region_size(size, num_layers, spec=spec)
    if strategy == "uniform":
        return _uniform(k, num_layers)
    if strategy == "first":
        return list(range(k))
    if strategy == "last":
        return list(range(num_layers - k, num_layers))
    if strategy == "middle":
        start = (num_layers - k) // 2
        return list(range(start, start + k))
    return sorted(random.Random(int(seed or 0)).sample(range(num_layers), k))


def select_layers(spec: str | Iterable[int], num_layers: int) -> list[int]:
    """Resolve a region spec to sorted, unique, 0-based decoder-layer indices.

    ``spec`` is a string of the grammar in this module's docstring (or an
    iterable of integer indices: ``int``, ``numpy.int64``, 0-d integer
    tensors, anything with ``__index__`` but ``bool``).  Raises ``ValueError`` naming the bad value,
    the layer count and the accepted forms.

    >>> select_layers("uniform_0.25", 32)
    [1, 5, 9, 13, 19, 23, 27, 31]
    """
    num_layers = _check_num_layers(num_layers)
    if not isinstance(spec, str):
        return _select_from_list(spec, num_layers)
    text = spec.strip().lower()
    if not text:
        raise _error(spec, num_layers, "it is empty")
    if text == "all":
        return list(range(num_layers))
    if text == "none":
        return []
    match = _STRATEGY.match(text)
    if match:
        return _select_strategy(spec, *match.groups(), num_layers)
    if re.match(r"^[a-z]", text):
        raise _error(spec, num_layers, "unknown strategy or malformed size")
    return _parse_index_list(text, num_layers)


def describe_indices(indices: Iterable[int]) -> str:
    """Compact comma-separated rendering of indices, e.g. ``'1,5,9,13'``."""
    return ",".join(str(i) for i in indices) or "(none)"
