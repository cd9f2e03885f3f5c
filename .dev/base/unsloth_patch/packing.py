"""Boundary-aware sample packing for TRL releases whose own packing concatenates examples.

TRL before 0.19 packs by concatenating every example into one stream cut at ``max_length``:
examples attend to each other and are cut mid-sentence. Where a user asks for packing there,
TRL prepares the dataset per example (tokenised and truncated exactly as for the padded run),
and this module groups the examples into rows of at most ``max_length`` tokens:

* :func:`best_fit_decreasing` — longest example first, each into the fullest row it still fits
  (a segment tree over the rows' free space finds it in ``O(log max_length)``); deterministic.
* :class:`PackedRows` — the training dataset of those rows; each item is a :class:`Row` of the
  examples' features (a tuple, so transformers' column filter passes it through untouched).
* :class:`RowCollator` — hands the rows' examples to the collator chain as one list: TRL's own
  collator builds each example's labels as in the padded run, and the padding-free collator
  lays them end to end with per-example ``position_ids`` and ``cu_seq_lens``.

So a step trains ``per_device_train_batch_size`` rows, as with TRL's packing, and every example
is its own sequence for the attention, as with TRL's best-fit-decreasing packing (0.21+).
"""

from __future__ import annotations

from typing import Sequence


class _FreeSpace:
    """Rows by free space: the row with the least free space that still fits ``n``, in O(log C)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        size = 1
        while size < capacity + 1:
            size *= 2
        self.size = size
        self.count = [0] * (2 * size)  # rows with exactly this much free space, summed up the tree
        self.rows: dict[int, list[int]] = {}

    def _add(self, free: int, delta: int) -> None:
        i = free + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def push(self, free: int, row: int) -> None:
        self.rows.setdefault(free, []).append(row)
        self._add(free, 1)

    def pop_fitting(self, n: int):
        """(free space, row) of the fullest row with at least ``n`` free, or None."""
        if n > self.capacity or self._first_at_least(n) is None:
            return None
        free = self._first_at_least(n)
        row = self.rows[free].pop()
        self._add(free, -1)
        return free, row

    def _first_at_least(self, n: int):
        # leftmost leaf >= n with a nonzero count
        node, lo, hi = 1, 0, self.size - 1
        return self._search(node, lo, hi, n)

    def _search(self, node, lo, hi, n):
        if hi < n or self.count[node] == 0:
            return None
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        left = self._search(2 * node, lo, mid, n)
        return left if left is not None else self._search(2 * node + 1, mid + 1, hi, n)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most ``capacity``.

    Examples are placed longest first (ties by index), each into the row that has the least free
    space still holding it, or a new row. Examples of length 0 are left out (nothing to train);
    one longer than ``capacity`` is an error: it should have been truncated before.
    """
    if capacity < 1:
        raise ValueError(f"packing needs a positive row length, got {capacity}")
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    space = _FreeSpace(capacity)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {capacity}")
        found = space.pop_fitting(n)
        if found is None:
            rows.append([i])
            free, row = capacity - n, len(rows) - 1
        else:
            free, row = found
            rows[row].append(i)
            free -= n
        if free > 0:
            space.push(free, row)
    return rows


class Row(tuple):
    """The examples packed into one row (their feature dicts)."""


class PackedRows:
    """A map-style dataset of packed rows over a per-example dataset (training only)."""

    def __init__(self, examples, rows: list[list[int]], capacity: int):
        self.examples = examples
        self.rows = rows
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return Row(self.examples[int(i)] for i in self.rows[index])

    def efficiency(self, lengths: Sequence[int]) -> float:
        """Real tokens over row capacity."""
        used = sum(int(lengths[i]) for row in self.rows for i in row)
        return used / (len(self.rows) * self.capacity) if self.rows else 0.0


class RowCollator:
    """Expands rows into their examples for ``inner`` (the padding-free collator chain)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rows, *args, **kwargs):
        features = [example for row in rows for example in (row if isinstance(row, Row) else (row,))]
        return self.inner(features, *args, **kwargs)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"RowCollator({self.inner!r})"
