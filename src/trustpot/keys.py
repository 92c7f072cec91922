"""Names, shapes and units of every field of a graph.

A graph is a flat ``dict[str, Tensor]``. A batch of structures is one graph whose atoms are
concatenated; ``batch`` maps atoms to structures. Internal units are Å, eV and e; conversion
happens only when reading or writing files.

Neighbour lists are keyed by the name of their :class:`NeighborListSpec`:
``edge_index:<name>`` and ``edge_shift:<name>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

Level = Literal["node", "edge", "graph"]


@dataclass(frozen=True)
class FieldSpec:
    """How a field is laid out: level, per-item shape, unit, and whether it is a float."""

    level: Level
    shape: tuple[int, ...]
    unit: str
    is_float: bool = True
    doc: str = ""


POSITIONS: Final = "positions"  # [n_atoms, 3] Å
ATOMIC_NUMBERS: Final = "atomic_numbers"  # [n_atoms] int64
CELL: Final = "cell"  # [n_graphs, 3, 3] Å, rows are lattice vectors (zeros when not periodic)
PBC: Final = "pbc"  # [n_graphs, 3] bool
BATCH: Final = "batch"  # [n_atoms] int64, index of the structure of each atom
N_ATOMS: Final = "n_atoms"  # [n_graphs] int64
ENERGY: Final = "energy"  # [n_graphs] eV
FORCES: Final = "forces"  # [n_atoms, 3] eV/Å
STRESS: Final = "stress"  # [n_graphs, 3, 3] eV/Å^3, positive under tension (ASE sign)
NODE_ENERGY: Final = "energies"  # [n_atoms] eV, per-atom contributions (ASE's name)
VIRIAL: Final = "virial"  # [n_graphs, 3, 3] eV
ENERGY_WEIGHT: Final = "energy_weight"  # [n_graphs] 0 where a structure has no energy label
FORCES_WEIGHT: Final = "forces_weight"  # [n_graphs] 0 where a structure has no force label
STRESS_WEIGHT: Final = "stress_weight"  # [n_graphs] 0 where a structure has no stress label

EDGE_INDEX_PREFIX: Final = "edge_index:"  # [2, n_edges] int64, rows (i, j)
EDGE_SHIFT_PREFIX: Final = "edge_shift:"  # [n_edges, 3] integer cell shifts (as float)


def edge_index_key(name: str) -> str:
    """Key of the ``[2, n_edges]`` neighbour pairs ``(i, j)`` of neighbour list ``name``.

    Row 0 is the centre atom ``i``, row 1 its neighbour ``j``; the vector from ``i`` to ``j`` is
    ``positions[j] - positions[i] + shift @ cell``.
    """
    return EDGE_INDEX_PREFIX + name


def edge_shift_key(name: str) -> str:
    """Key of the ``[n_edges, 3]`` integer cell shifts of neighbour list ``name``."""
    return EDGE_SHIFT_PREFIX + name


FIELD_SPECS: Final[dict[str, FieldSpec]] = {
    POSITIONS: FieldSpec("node", (3,), "Å", doc="Cartesian positions"),
    ATOMIC_NUMBERS: FieldSpec("node", (), "", is_float=False, doc="atomic numbers"),
    BATCH: FieldSpec("node", (), "", is_float=False, doc="structure index of each atom"),
    CELL: FieldSpec("graph", (3, 3), "Å", doc="lattice vectors as rows"),
    PBC: FieldSpec("graph", (3,), "", is_float=False, doc="periodic directions"),
    N_ATOMS: FieldSpec("graph", (), "", is_float=False, doc="atoms per structure"),
    ENERGY: FieldSpec("graph", (), "eV", doc="total potential energy"),
    FORCES: FieldSpec("node", (3,), "eV/Å", doc="forces, -dE/dr"),
    STRESS: FieldSpec("graph", (3, 3), "eV/Å^3", doc="stress tensor, ASE sign convention"),
    NODE_ENERGY: FieldSpec("node", (), "eV", doc="per-atom energy contributions"),
    VIRIAL: FieldSpec("graph", (3, 3), "eV", doc="virial, -dE/d(strain)"),
    ENERGY_WEIGHT: FieldSpec("graph", (), "", doc="1 where the energy label exists"),
    FORCES_WEIGHT: FieldSpec("graph", (), "", doc="1 where the force label exists"),
    STRESS_WEIGHT: FieldSpec("graph", (), "", doc="1 where the stress label exists"),
}

# -- result vocabulary of the reliability wrappers (trustpot.uq) ---------------------------
ENERGY_STD: Final = "energy_std"  # [n_graphs] eV, predictive standard deviation of the energy
FORCES_STD: Final = "forces_std"  # [n_atoms] eV/Å, per-atom force standard deviation
RELIABILITY: Final = "reliability"  # [n_graphs] in [0, 1], probability the prediction is reliable
ENERGY_SAMPLES: Final = "energy_samples"  # [n_graphs, M] eV, ensemble or stochastic samples
FORCES_SAMPLES: Final = "forces_samples"  # [n_atoms, M, 3] eV/Å
ATOM_IMPORTANCE: Final = "atom_importance"  # [n_atoms] attention weight of each atom (sums to 1)
#: the same standard deviations before recalibration (the method's own ranking signal)
#: kNN distance of a structure's atom embeddings to the calibration data (1: a typical
#: calibration atom; max over atoms), PROBE's off-manifold signal
EMBEDDING_DISTANCE: Final = "embedding_distance"  # [n_graphs] dimensionless
ENERGY_STD_RAW: Final = "energy_std_raw"  # [n_graphs] eV
FORCES_STD_RAW: Final = "forces_std_raw"  # [n_atoms] eV/Å

FIELD_SPECS.update(
    {
        ENERGY_STD: FieldSpec("graph", (), "eV", doc="energy standard deviation"),
        FORCES_STD: FieldSpec("node", (), "eV/Å", doc="per-atom force standard deviation"),
        RELIABILITY: FieldSpec("graph", (), "", doc="probability that the prediction is reliable"),
        ENERGY_SAMPLES: FieldSpec("graph", (-1,), "eV", doc="energy samples"),
        FORCES_SAMPLES: FieldSpec("node", (-1, 3), "eV/Å", doc="force samples"),
        ATOM_IMPORTANCE: FieldSpec("node", (), "", doc="per-atom importance"),
        ENERGY_STD_RAW: FieldSpec("graph", (), "eV", doc="energy std before recalibration"),
        EMBEDDING_DISTANCE: FieldSpec("graph", (), "", doc="kNN embedding distance to the data"),
        FORCES_STD_RAW: FieldSpec("node", (), "eV/Å", doc="force std before recalibration"),
    }
)

# -- outputs of scale mixtures (trustpot.models.mixture) -----------------------------------
ENERGY_SHORT: Final = "energy_short"  # [n_graphs] eV, total energy of the short branch
ENERGY_LONG: Final = "energy_long"  # [n_graphs] eV, total energy of the long branch (with Coulomb)
ENERGY_ELECTROSTATIC: Final = "energy_electrostatic"  # [n_graphs] eV, Coulomb part of the long
NODE_ENERGY_SHORT: Final = "energies_short"  # [n_atoms] eV
NODE_ENERGY_LONG: Final = "energies_long"  # [n_atoms] eV
FORCES_SHORT: Final = "forces_short"  # [n_atoms, 3] eV/Å, -dE_short/dr
FORCES_LONG: Final = "forces_long"  # [n_atoms, 3] eV/Å, -dE_long/dr
SCALE: Final = "scale"  # [n_atoms] s_i in [0, 1]
CHARGES: Final = "charges"  # [n_atoms] e, learned charges of the long branch

FIELD_SPECS.update(
    {
        ENERGY_SHORT: FieldSpec("graph", (), "eV", doc="total energy of the short branch"),
        ENERGY_LONG: FieldSpec("graph", (), "eV", doc="total energy of the long branch"),
        ENERGY_ELECTROSTATIC: FieldSpec("graph", (), "eV", doc="Coulomb energy (long branch)"),
        NODE_ENERGY_SHORT: FieldSpec("node", (), "eV", doc="per-atom energies, short branch"),
        NODE_ENERGY_LONG: FieldSpec("node", (), "eV", doc="per-atom energies, long branch"),
        FORCES_SHORT: FieldSpec("node", (3,), "eV/Å", doc="forces of the short branch"),
        FORCES_LONG: FieldSpec("node", (3,), "eV/Å", doc="forces of the long branch"),
        SCALE: FieldSpec("node", (), "", doc="per-atom mixing scale s in [0, 1]"),
        CHARGES: FieldSpec("node", (), "e", doc="learned partial charges"),
    }
)

# -- user-named properties (a property head of a fine-tuned model) ------------------------
#: ``property:<name>``: the prediction of the property stored under ``<name>`` in the frames
#: (``Structure.info`` per structure, ``Structure.arrays`` per atom), and its reference values
#: in a training batch; the model that returns it declares its spec (:func:`property_spec`).
PROPERTY_PREFIX: Final = "property:"


def property_key(name: str) -> str:
    """Output (and batch) key of the property stored under ``name`` in the frames."""
    return PROPERTY_PREFIX + name


def property_spec(level: Level, shape: tuple[int, ...], unit: str, doc: str = "") -> FieldSpec:
    """Spec of a user-named property: ``level`` ``graph`` (one value per structure) or
    ``node`` (per atom), per-item ``shape`` (``()`` a scalar, ``(3,)`` a vector), ``unit`` as
    the frames store it (free text, e.g. ``eV``, ``e*Å``, ``Debye``; may be empty)."""
    if level not in ("graph", "node"):
        raise ValueError(f"a property is per structure ('graph') or per atom ('node'), not {level}")
    return FieldSpec(level, tuple(shape), unit, doc=doc or "user-named property")


#: Properties a potential may be asked for, with their units.
OUTPUT_UNITS: Final[dict[str, str]] = {
    ENERGY: "eV",
    FORCES: "eV/Å",
    STRESS: "eV/Å^3",
    NODE_ENERGY: "eV",
    VIRIAL: "eV",
}


def field_spec(key: str) -> FieldSpec:
    """Spec of ``key``; neighbour-list keys are edge-level fields."""
    if key.startswith(EDGE_INDEX_PREFIX):
        return FieldSpec("edge", (2,), "", is_float=False, doc="neighbour pairs")
    if key.startswith(EDGE_SHIFT_PREFIX):
        return FieldSpec("edge", (3,), "", doc="integer cell shifts")
    return FIELD_SPECS[key]


def specs_of(names: Iterable[str]) -> dict[str, FieldSpec]:
    """``{name: field_spec(name)}`` for each of ``names`` (a model's output declaration)."""
    return {name: field_spec(name) for name in names}
