"""Samples -> rows: one sample a row, or first-fit-decreasing packing of samples into rows of at most ``capacity``
tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rows:
    """The rows of one split: the sample indices of every row, its tokens and its trained tokens."""

    samples: list[list[int]]
    lengths: list[int]
    supervised: list[int]


def make_rows(lengths: Sequence[int], supervised: Sequence[int], capacity: int, packing: bool) -> Rows:
    """Rows of the samples with ``lengths`` tokens (``supervised`` of them trained); empty samples are left out."""
    nonempty = [i for i, n in enumerate(lengths) if n > 0]
    if packing:
        packed = pack_first_fit_decreasing([lengths[i] for i in nonempty], capacity)
        rows = [[nonempty[j] for j in row] for row in packed]
    else:
        rows = [[i] for i in nonempty]
    return Rows(
        rows, [sum(lengths[i] for i in row) for row in rows], [sum(supervised[i] for i in row) for row in rows]
    )


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sample indices into rows: longest first, each into the first row that still has room.

    Ties keep index order, so the result is deterministic. A segment tree over the rows' free space finds the
    first row with room in O(log n).

    Returns:
        Rows as lists of sample indices, in the order the rows were opened.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit in rows of {capacity}")
    size = 1
    while size < n:
        size *= 2
    free = [capacity] * (2 * size)  # free[node] = most free space of any row under node; leaves size..2*size-1
    rows: list[list[int]] = []
    for index in sorted(range(n), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        node = 1
        while node < size:  # descend to the leftmost row with room
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= length
        while node > 1:  # update the maxima above it, until one does not change
            node //= 2
            left, right = free[2 * node], free[2 * node + 1]
            most = left if left > right else right
            if free[node] == most:
                break
            free[node] = most
    return rows
