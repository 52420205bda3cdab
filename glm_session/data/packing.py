"""First-fit-decreasing packing of samples into rows of at most ``capacity`` tokens."""

from __future__ import annotations

from collections.abc import Sequence


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
