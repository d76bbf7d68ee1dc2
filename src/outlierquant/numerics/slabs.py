"""Bounded working memory for elementwise weight math: a large matrix (an LM head of
65536 x 512 is 256 MiB in float64) is processed a slab of rows or columns at a time, so a
computation's temporaries stay near :data:`SLAB_ELEMENTS` elements whatever the model.
Only for work where each element (or each row/column) is computed on its own: slabs then
give exactly the one-pass values.
"""

from __future__ import annotations

from typing import Iterator

#: elements of one slab (float64 temporaries of 8 MiB): a computation keeps a few such
#: temporaries at once (a product and its operands), and at 2**22 elements those were the
#: largest part of the rotation and smoothing passes' peaks on a vocabulary-sized weight
#: (~128 MiB beside the model); numpy's per-call cost is still negligible at this size
SLAB_ELEMENTS = 2**20


def slabs(count: int, per_item: int, align: int = 1) -> Iterator[slice]:
    """Slices over ``count`` items (rows or columns) of ``per_item`` elements each, every
    slice holding about :data:`SLAB_ELEMENTS` elements (at least ``align`` items, and a
    multiple of ``align`` except the last: blocks of ``align`` rows stay whole)."""
    align = max(1, int(align))
    step = max(align, SLAB_ELEMENTS // max(1, int(per_item)) // align * align)
    for start in range(0, count, step):
        yield slice(start, start + step)
