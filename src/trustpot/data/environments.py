"""Local-environment labels of atoms: the element and the elements bonded to it.

An atom's environment is its element followed by the sorted counts of the elements within a
bond cutoff, ``factor`` times the sum of the two covalent radii (``ase.data.covalent_radii``,
Å; ``factor`` 1.2 by default). Periodic images count (vesin neighbour list,
:func:`trustpot.data.neighbors.neighbor_pairs`). Examples: ``O(H2)`` and ``H(O1)`` in water,
``C(H4)`` in methane, ``Si(O4)`` and ``O(Si2)`` in silica, ``C(C1H3)`` for the methyl carbon of
ethanol; an atom with no bonded neighbour is ``Na()``. Neighbour elements are in alphabetical
order of their symbols, every count written (``H1``), so one environment has one spelling.

Environments seen on fewer than ``min_count`` atoms of a data set are pooled into
``<element>(other)``, so that a rare distortion does not make a group of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from ase.data import chemical_symbols, covalent_radii

from trustpot.data.neighbors import neighbor_pairs
from trustpot.data.structures import Structure

__all__ = ["BOND_FACTOR", "MIN_COUNT", "environment_labels", "environments", "pool_rare"]

#: bonded when closer than this factor times the sum of the covalent radii
BOND_FACTOR = 1.2
#: environments with fewer atoms than this in a data set become ``<element>(other)``
MIN_COUNT = 3


def environment_labels(s: Structure, factor: float = BOND_FACTOR) -> list[str]:
    """The environment label of each of the [n_atoms] atoms of ``s`` (not pooled).

    Args:
        s: one structure (positions Å, periodic where ``s.pbc`` says).
        factor: bond cutoff as a multiple of the sum of the two covalent radii.
    """
    numbers = s.numbers.astype(np.int64)
    radii = np.asarray(covalent_radii)[numbers]
    counts: list[Counter[str]] = [Counter() for _ in range(s.n_atoms)]
    if s.n_atoms and radii.max() > 0:
        cutoff = factor * 2.0 * float(radii.max())
        i, j, _, d = neighbor_pairs(s.positions, s.cell, s.pbc, cutoff, with_distances=True)
        bonded = d < factor * (radii[i] + radii[j])
        for a, b in zip(i[bonded], j[bonded]):
            counts[int(a)][chemical_symbols[int(numbers[b])]] += 1
    return [
        f"{chemical_symbols[int(z)]}({''.join(f'{el}{n}' for el, n in sorted(c.items()))})"
        for z, c in zip(numbers, counts)
    ]


def pool_rare(labels: Sequence[str], min_count: int = MIN_COUNT) -> np.ndarray:
    """[n] ``labels`` with those seen fewer than ``min_count`` times replaced by
    ``<element>(other)`` (a string array)."""
    seen = Counter(labels)
    return np.array(
        [x if seen[x] >= min_count else x.split("(")[0] + "(other)" for x in labels], dtype=str
    )


def environments(
    structures: Sequence[Structure], factor: float = BOND_FACTOR, min_count: int = MIN_COUNT
) -> np.ndarray:
    """[n_atoms] environment labels of every atom of ``structures`` in order (structures
    concatenated, as a batch stacks them), rare ones pooled (:func:`pool_rare`)."""
    labels = [x for s in structures for x in environment_labels(s, factor)]
    return pool_rare(labels, min_count)
