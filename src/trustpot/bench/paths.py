"""Far-from-data probe paths for any molecule, and a model's errors along them.

MD at room temperature rarely visits eclipsed conformers or stretched bonds; these paths go
there on purpose, from one structure of a molecule (no periodic cell). A torsion scan rotates
one side of a rotatable bond rigidly about the bond axis (:func:`torsion_scan`), a bond stretch
pulls one side rigidly away from the other (:func:`bond_stretch`), on bonds from covalent radii
(:func:`bonds`). :func:`probe_paths` picks a few of each, :func:`label_paths` labels them with
GFN2-xTB, :func:`write_paths` / :func:`read_paths` store them in one extended XYZ file, and
:func:`path_errors`, :func:`path_force_errors` and :func:`plot_paths` score models on them.
Energies are compared relative along a path: each curve is shifted to its own minimum (a
model's energy zero need not be the reference's). Units: Å, degrees, eV, eV/Å.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple, cast

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols, covalent_radii

from trustpot.metrics.accuracy import FloatArray, as_float_array, mae, rmse
from trustpot.parallel import Workers

#: Two atoms are bonded when closer than this factor times the sum of their covalent radii.
BOND_FACTOR = 1.2
#: A torsion must move some atom of each side at least this far from the bond axis (Å): a
#: linear group (C#N, C#C-H) has nothing to rotate, even when thermal bending tilts it.
MIN_OFF_AXIS = 0.5
#: Unit of each path kind's coordinate.
UNITS = {"torsion": "deg", "stretch": "Å"}
#: ``atoms.info`` keys carried from the input structure to every frame (xTB reads them).
CHARGE_KEYS = ("charge", "uhf", "multiplicity")

Bond = tuple[int, int]
PathKind = Literal["torsion", "stretch"]


@dataclass(frozen=True)
class ProbePath:
    """A one-dimensional path of frames.

    Attributes:
        name: e.g. ``"torsion C0-C1"`` (element symbol and 0-based atom index).
        kind: ``"torsion"`` or ``"stretch"``.
        atoms_index: the bond ``(i, j)`` the path acts on.
        frames: the structures, in path order; labelled ones carry ``info["energy"]`` (eV) and
            ``arrays["forces"]`` ([n_atoms, 3] eV/Å).
        coords: [n_frames] coordinate of each frame: angle (degrees) or bond length (Å).
        unit: ``"deg"`` or ``"Å"``.
        dropped: frames removed because the reference calculation failed on them.
    """

    name: str
    kind: PathKind
    atoms_index: Bond
    frames: tuple[Atoms, ...]
    coords: tuple[float, ...]
    unit: str
    dropped: int = 0


# -- bond graph --------------------------------------------------------------------------------
def bonds(atoms: Atoms) -> list[Bond]:
    """Covalent bonds ``(i, j)``, ``i < j``, sorted: ``d_ij < 1.2 (r_i + r_j)`` with ASE's
    covalent radii (Å).

    Raises:
        ValueError: ``atoms`` is periodic (minimum-image bonds are not handled).
    """
    if np.any(atoms.pbc):
        raise ValueError("bonds() is for a molecule: atoms must not be periodic")
    pos = np.asarray(atoms.positions, dtype=np.float64)
    radii = covalent_radii[atoms.numbers]
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    close = np.triu(d < BOND_FACTOR * (radii[:, None] + radii[None, :]), k=1)
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(close))]


def _graph(atoms: Atoms) -> tuple[list[Bond], list[list[int]]]:
    """:func:`bonds` and each atom's bonded neighbours."""
    bond_list = bonds(atoms)
    adj: list[list[int]] = [[] for _ in range(len(atoms))]
    for i, j in bond_list:
        adj[i].append(j)
        adj[j].append(i)
    return bond_list, adj


def _side(adj: Sequence[Sequence[int]], start: int, cut: Bond) -> set[int]:
    """The atoms reachable from ``start`` without crossing the bond ``cut``."""
    seen, stack = {start}, [start]
    while stack:
        k = stack.pop()
        for m in adj[k]:
            if {k, m} != set(cut) and m not in seen:
                seen.add(m)
                stack.append(m)
    return seen


class _Split(NamedTuple):
    fixed: int  # the bond atom that stays
    pivot: int  # the bond atom that moves (with ``moving``)
    moving: list[int]
    ring: bool


def _split(numbers: np.ndarray, adj: Sequence[Sequence[int]], bond: Bond) -> _Split:
    """Which atoms move for ``bond = (i, j)``: the smaller side (j's on a tie); in a ring, j
    and the hydrogens bonded to it."""
    i, j = bond
    if j not in adj[i]:
        raise ValueError(f"atoms {i} and {j} are not bonded")
    side_j = _side(adj, j, bond)
    if i in side_j:
        hydrogens = [k for k in adj[j] if k != i and numbers[k] == 1]
        return _Split(i, j, sorted([j, *hydrogens]), True)
    side_i = _side(adj, i, bond)
    if len(side_j) <= len(side_i):
        return _Split(i, j, sorted(side_j), False)
    return _Split(j, i, sorted(side_i), False)


def _start(atoms: Atoms, bond: Bond, n: int) -> tuple[_Split, np.ndarray]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    split = _split(atoms.numbers, _graph(atoms)[1], bond)
    return split, np.asarray(atoms.positions, dtype=np.float64)


def rotatable_bonds(atoms: Atoms) -> list[Bond]:
    """Bonds ``(i, j)`` (in :func:`bonds` order) whose torsion moves something: neither atom is
    hydrogen, the bond is in no ring (cutting it splits the molecule in two), and each side
    holds an atom other than ``i`` and ``j`` that is at least :data:`MIN_OFF_AXIS` from the
    bond axis."""
    bond_list, adj = _graph(atoms)
    pos = np.asarray(atoms.positions, dtype=np.float64)

    def off_axis(side: set[int], i: int, j: int) -> float:
        axis = (pos[j] - pos[i]) / np.linalg.norm(pos[j] - pos[i])
        return float(np.linalg.norm(np.cross(pos[sorted(side)] - pos[i], axis), axis=1).max())

    out = []
    for i, j in bond_list:
        if atoms.numbers[i] == 1 or atoms.numbers[j] == 1:
            continue
        side_j = _side(adj, j, (i, j))
        if i in side_j:
            continue
        side_i = _side(adj, i, (i, j))
        if min(off_axis(side_i, i, j), off_axis(side_j, i, j)) >= MIN_OFF_AXIS:
            out.append((i, j))
    return out


def _frame(atoms: Atoms, positions: np.ndarray) -> Atoms:
    frame = Atoms(numbers=atoms.numbers, positions=positions)
    frame.info.update({k: atoms.info[k] for k in CHARGE_KEYS if k in atoms.info})
    return frame


def _rotate(points: np.ndarray, origin: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """``points`` [n, 3] rotated counter-clockwise by ``degrees`` about the unit ``axis`` [3]
    through ``origin`` [3] (Rodrigues' formula)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    p = points - origin
    rotated = c * p + s * np.cross(axis, p) + (1.0 - c) * np.outer(p @ axis, axis)
    return np.asarray(rotated + origin, dtype=np.float64)


# -- paths -------------------------------------------------------------------------------------
def torsion_scan(atoms: Atoms, bond: Bond, n: int) -> tuple[list[Atoms], list[float]]:
    """Rotate the smaller side of ``bond`` rigidly about the bond axis.

    The side of ``j`` rotates when it has no more atoms than the side of ``i`` (so a tie
    rotates ``j``'s side), else ``i``'s side. The rotation is counter-clockwise looking down
    the axis from the fixed bond atom to the rotating one, by ``linspace(0, 360, n + 1)[:-1]``
    degrees: frame 0 is the input and the next step would close the period. Bond lengths
    within each side and both bond atoms stay where they were.

    Returns:
        ``(frames, angles)``: ``n`` plain ``Atoms`` (numbers, positions; ``charge``/``uhf``/
        ``multiplicity`` info copied) and their angles (degrees).

    Raises:
        ValueError: ``n < 1``, the atoms are not bonded, or the bond is in a ring.
    """
    split, pos = _start(atoms, bond, n)
    if split.ring:
        raise ValueError(f"bond {bond} is in a ring: a rigid torsion would break the ring")
    origin = pos[split.fixed]
    axis = pos[split.pivot] - origin
    axis = axis / np.linalg.norm(axis)
    frames, angles = [], []
    for angle in np.linspace(0.0, 360.0, n + 1)[:-1]:
        positions = pos.copy()
        positions[split.moving] = _rotate(pos[split.moving], origin, axis, float(angle))
        frames.append(_frame(atoms, positions))
        angles.append(float(angle))
    return frames, angles


def bond_stretch(
    atoms: Atoms, bond: Bond, n: int, extra: float = 1.2
) -> tuple[list[Atoms], list[float]]:
    """Pull ``bond`` apart by ``linspace(0, extra, n)`` Å.

    The smaller side (as in :func:`torsion_scan`: ``j``'s side on a tie) moves rigidly along
    the bond axis, away from the other. A bond in a ring cannot be pulled apart rigidly:
    there only atom ``j`` and the hydrogens bonded to it move (the ring's other bonds to ``j``
    stretch too).

    Returns:
        ``(frames, lengths)``: ``n`` plain ``Atoms`` (as :func:`torsion_scan`) and the bond
        length of each (Å), from the input's length to it plus ``extra``.

    Raises:
        ValueError: ``n < 1``, or the atoms are not bonded.
    """
    split, pos = _start(atoms, bond, n)
    axis = pos[split.pivot] - pos[split.fixed]
    r0 = float(np.linalg.norm(axis))
    frames, lengths = [], []
    for d in np.linspace(0.0, extra, n):
        positions = pos.copy()
        positions[split.moving] += d * axis / r0
        frames.append(_frame(atoms, positions))
        lengths.append(r0 + float(d))
    return frames, lengths


def probe_paths(
    atoms: Atoms,
    n_torsion: int = 24,
    n_stretch: int = 16,
    max_torsions: int = 2,
    max_stretches: int = 2,
    extra: float = 1.2,
) -> list[ProbePath]:
    """Torsion scans and bond stretches of one molecule, deterministically chosen.

    Bonds are ranked by ``(-heavy atoms on the moving side, i, j)`` (moving side as in
    :func:`torsion_scan` / :func:`bond_stretch`), so that bonds near the middle of the molecule
    come first. The paths, in this order:

    - torsions: the first ``max_torsions`` :func:`rotatable_bonds` by that rank,
      ``n_torsion`` frames each;
    - stretches: the first ``max_stretches`` bonds between two non-hydrogen atoms by that rank
      (bond orders are not perceived: a double bond counts too), then one X-H bond oriented
      ``(X, H)`` so that the H leaves: the first, by atom indices, of the bonds of H to
      non-carbon atoms (O-H, N-H: proton loss), else of the C-H bonds; ``n_stretch`` frames
      each, pulled by up to ``extra`` Å.

    So there are at most ``max_torsions + max_stretches + 1`` paths; fewer when the molecule
    has fewer such bonds (benzene has no rotatable bond).
    """
    bond_list, adj = _graph(atoms)
    heavy = atoms.numbers != 1

    def rank(bond: Bond) -> tuple[int, int, int]:
        moving = _split(atoms.numbers, adj, bond).moving
        return (-int(heavy[moving].sum()), bond[0], bond[1])

    stretches = sorted([(i, j) for i, j in bond_list if heavy[i] and heavy[j]], key=rank)
    x_h = [(i, j) if heavy[i] else (j, i) for i, j in bond_list if heavy[i] != heavy[j]]
    x_h.sort(key=lambda b: (bool(atoms.numbers[b[0]] == 6), sorted(b)))
    chosen: list[tuple[PathKind, Bond]] = [
        *(("torsion", b) for b in sorted(rotatable_bonds(atoms), key=rank)[:max_torsions]),
        *(("stretch", b) for b in stretches[:max_stretches] + x_h[:1]),
    ]
    symbol = [chemical_symbols[z] for z in atoms.numbers]
    paths = []
    for kind, (i, j) in chosen:
        if kind == "torsion":
            frames, coords = torsion_scan(atoms, (i, j), n_torsion)
        else:
            frames, coords = bond_stretch(atoms, (i, j), n_stretch, extra)
        name = f"{kind} {symbol[i]}{i}-{symbol[j]}{j}"
        paths.append(ProbePath(name, kind, (i, j), tuple(frames), tuple(coords), UNITS[kind]))
    return paths


# -- labels and storage ------------------------------------------------------------------------
def _labelled(frame: Atoms, energy: float, forces: np.ndarray) -> Atoms:
    out = _frame(frame, np.array(frame.positions, dtype=np.float64))
    out.info["energy"] = float(energy)
    out.arrays["forces"] = np.asarray(forces, dtype=np.float64).reshape(len(frame), 3)
    return out


def label_paths(
    paths: Sequence[ProbePath], work_dir: str | Path, workers: Workers = 1
) -> list[ProbePath]:
    """Label every frame with GFN2-xTB (:func:`trustpot.engines.xtb.label_file`).

    All frames go to ``work_dir/unlabelled.xyz`` and are labelled into ``work_dir/labelled.xyz``;
    a rerun with the same paths resumes there (a ``work_dir`` holding another path set's run is
    an error of the engine). Frames whose SCF failed are dropped with their coordinate and
    counted in :attr:`ProbePath.dropped`.

    Returns:
        the paths, in order, with frames carrying ``info["energy"]`` (eV) and
        ``arrays["forces"]`` ([n_atoms, 3] eV/Å).

    Raises:
        ConfigError: the ``xtb`` extra is missing.
    """
    from ase.io import read, write

    from trustpot.engines.xtb import label_file

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    source, target = work / "unlabelled.xyz", work / "labelled.xyz"
    write(source, [_frame(a, a.positions) for p in paths for a in p.frames], format="extxyz")
    label_file(source, target, workers=workers, progress=False)
    done = read(target, ":") if target.is_file() and target.stat().st_size else []
    by_index = {int(a.info["source_frame"]): a for a in done}
    out, start = [], 0
    for p in paths:
        frames, coords = [], []
        for k, (frame, coord) in enumerate(zip(p.frames, p.coords)):
            result = by_index.get(start + k)
            if result is not None:
                energy = result.get_potential_energy()
                frames.append(_labelled(frame, energy, result.get_forces()))
                coords.append(coord)
        start += len(p.frames)
        dropped = p.dropped + len(p.frames) - len(frames)
        out.append(replace(p, frames=tuple(frames), coords=tuple(coords), dropped=dropped))
    return out


def write_paths(paths: Sequence[ProbePath], file: str | Path) -> None:
    """Write paths to one extended XYZ file: each frame's ``info`` holds ``path_name``,
    ``path_kind``, ``path_bond``, ``path_coord`` and ``path_dropped`` beside its labels (if
    any). A path without frames is not stored."""
    from ase.io import write

    frames = []
    for p in paths:
        for frame, coord in zip(p.frames, p.coords):
            a = _frame(frame, frame.positions)
            if "energy" in frame.info:
                a = _labelled(frame, frame.info["energy"], frame.arrays["forces"])
            a.info.update(
                path_name=p.name,
                path_kind=p.kind,
                path_bond=np.array(p.atoms_index),
                path_coord=float(coord),
                path_dropped=int(p.dropped),
            )
            frames.append(a)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    write(file, frames, format="extxyz")


def read_paths(file: str | Path) -> list[ProbePath]:
    """The paths :func:`write_paths` wrote, in order (consecutive frames of one ``path_name``
    form a path)."""
    from ase.io import read

    groups: list[list[Atoms]] = []
    for a in read(file, ":", format="extxyz"):
        if not groups or groups[-1][0].info["path_name"] != a.info["path_name"]:
            groups.append([])
        groups[-1].append(a)
    out = []
    for group in groups:
        frames = []
        for a in group:  # the extxyz reader moves energy and forces to a calculator
            results = a.calc.results if a.calc is not None else {}
            energy, forces = results.get("energy"), results.get("forces")
            plain = _frame(a, a.positions)
            if energy is not None and forces is not None:
                plain = _labelled(plain, energy, forces)
            frames.append(plain)
        info = group[0].info
        kind, (i, j) = str(info["path_kind"]), np.atleast_1d(info["path_bond"])
        if kind not in UNITS:
            raise ValueError(f"{file}: unknown path kind '{kind}'")
        coords = tuple(float(a.info["path_coord"]) for a in group)
        bond, dropped = (int(i), int(j)), int(info["path_dropped"])
        name, unit = str(info["path_name"]), UNITS[kind]
        out.append(
            ProbePath(name, cast(PathKind, kind), bond, tuple(frames), coords, unit, dropped)
        )
    return out


# -- scores ------------------------------------------------------------------------------------
def path_energies(path: ProbePath) -> FloatArray:
    """[n_frames] labelled energies of a path (eV)."""
    return np.array([a.info["energy"] for a in path.frames], dtype=np.float64)


def path_errors(
    reference_energies: Sequence[float] | np.ndarray,
    predicted_energies: Sequence[float] | np.ndarray,
    coords: Sequence[float] | np.ndarray,
) -> dict[str, float]:
    """Relative-energy errors along one path.

    Each curve ([n_points] eV) is first shifted by its own minimum, so both start from zero
    wherever their minima lie; errors are ``shifted prediction - shifted reference``.

    Returns:
        ``relative_rmse``, ``relative_max_error`` (max absolute error) and
        ``max_error_coord`` (the coordinate where it occurs), ``reference_barrier`` and
        ``predicted_barrier`` (max - min of each curve), ``barrier_error`` (predicted -
        reference), all eV but the coordinate (the path's unit); and ``n_points``.

    Raises:
        ValueError: empty curves, or curves of different lengths.
    """
    ref, pred, x = (
        as_float_array(v).reshape(-1) for v in (reference_energies, predicted_energies, coords)
    )
    if not ref.size or ref.shape != pred.shape or ref.shape != x.shape:
        raise ValueError(f"need equal non-empty curves, got {ref.size}, {pred.size}, {x.size}")
    ref, pred = ref - ref.min(), pred - pred.min()
    error = pred - ref
    worst = int(np.argmax(np.abs(error)))
    return {
        "relative_rmse": rmse(error),
        "relative_max_error": float(abs(error[worst])),
        "max_error_coord": float(x[worst]),
        "reference_barrier": float(ref.max()),
        "predicted_barrier": float(pred.max()),
        "barrier_error": float(pred.max() - ref.max()),
        "n_points": int(ref.size),
    }


def path_force_errors(
    reference_forces: Sequence[np.ndarray], predicted_forces: Sequence[np.ndarray]
) -> dict[str, float]:
    """Force errors over all atoms of all frames of a path (each frame [n_atoms, 3] eV/Å):
    ``force_mae`` and ``force_rmse`` (eV/Å, over Cartesian components, as
    :mod:`trustpot.metrics.accuracy`) and ``n_atoms``."""
    if len(reference_forces) != len(predicted_forces):
        raise ValueError(f"{len(reference_forces)} reference but {len(predicted_forces)} predicted")
    diffs = [
        as_float_array(p) - as_float_array(r) for r, p in zip(reference_forces, predicted_forces)
    ]
    error = np.concatenate([d.reshape(-1, 3) for d in diffs]) if diffs else np.zeros((0, 3))
    return {"force_mae": mae(error), "force_rmse": rmse(error), "n_atoms": len(error)}


def plot_paths(
    paths: Sequence[ProbePath],
    predictions: Mapping[str, Sequence[np.ndarray]],
    file: str | Path,
) -> None:
    """One panel per labelled path: the reference (black) and each model's energies, each
    shifted to its own minimum, against the path's coordinate.

    Args:
        paths: labelled paths (:func:`label_paths`).
        predictions: model name -> per path, [n_frames] predicted energies (eV) of the
            path's (labelled, so possibly fewer than generated) frames.
        file: image file (PNG, PDF, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(3, len(paths)))
    rows = max(1, math.ceil(len(paths) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(paths):
            ax.set_visible(False)
            continue
        p = paths[k]
        x = np.asarray(p.coords)
        ref = path_energies(p)
        ax.plot(x, ref - ref.min(), "k-", lw=2, label="reference")
        for model, energies in predictions.items():
            e = as_float_array(energies[k])
            ax.plot(x, e - e.min(), "-", marker=".", label=model)
        label = "angle" if p.kind == "torsion" else "bond length"
        ax.set(title=p.name, xlabel=f"{label} ({p.unit})", ylabel="relative energy (eV)")
        if k == 0:
            ax.legend(fontsize="small")
    fig.tight_layout()
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=150)
    plt.close(fig)
