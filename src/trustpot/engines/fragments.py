"""Fragment-annotated molecules: substituents (SMILES with one attachment point ``*``) placed on
scaffold sites and joined by RDKit's ``molzip``; every product is sanitised and canonicalised.

Scaffolds: ``benzene`` (6 aromatic sites), ``cyclohexane`` (6 sites) and ``chain`` (a linear
alkane of ``chain_length`` carbons, site ``k`` on carbon ``k``); one fragment per site,
free sites carry hydrogens. A molecule is a :class:`MoleculeSpec`; its annotations (written to
``atoms.info`` by :func:`annotate_frames`): ``scaffold``, ``chain_length`` (chains only),
``fragments`` (sorted comma-separated names of the fragment types present, ``none`` if none),
``n_<fragment>`` for every fragment of the library, and ``smiles`` (canonical, the same string
the xTB engine records as provenance). Each frame also gets a per-atom array ``fragment_label``:
0 for scaffold atoms, ``1 + index`` of the fragment type in the library otherwise; hydrogens
take the label of the heavy atom they are bonded to.

The four benchmark tasks and the data builder live in :mod:`trustpot.engines.compositional`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.errors import ConfigError, DataError

#: Label of scaffold atoms in ``fragment_label``.
SCAFFOLD_LABEL = 0
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Fragment:
    """A substituent.

    Attributes:
        name: lower-case identifier (used in ``n_<name>`` info keys).
        smiles: SMILES with exactly one attachment point ``*``, e.g. ``*C(=O)O``.
    """

    name: str
    smiles: str

    def check(self) -> None:
        """Raise :class:`ConfigError` for a bad name, no single ``*``, or unparsable SMILES."""
        if not _NAME.match(self.name):
            raise ConfigError(f"fragment name '{self.name}' must match {_NAME.pattern}")
        if self.smiles.count("*") != 1:
            raise ConfigError(f"fragment '{self.name}': SMILES '{self.smiles}' needs one '*'")
        if _parse(self.smiles) is None:
            raise ConfigError(f"fragment '{self.name}': RDKit cannot parse '{self.smiles}'")

    def labelled(self, label: int) -> str:
        """The SMILES with its attachment point numbered ``label`` (``[*:label]``)."""
        return self.smiles.replace("*", f"[*:{label}]", 1)


@dataclass(frozen=True)
class Scaffold:
    """A backbone with numbered sites.

    Attributes:
        name: identifier.
        atom: SMILES of one backbone atom (``c`` aromatic, ``C`` aliphatic).
        ring: closed ring (``size`` fixed) or open chain (length given per molecule).
        size: number of ring atoms; ignored for chains.
    """

    name: str
    atom: str
    ring: bool
    size: int = 0

    def n_sites(self, chain_length: int | None) -> int:
        """Backbone atoms (= sites) of one molecule."""
        if self.ring:
            if chain_length is not None:
                raise ConfigError(f"scaffold '{self.name}' is a ring: no chain_length")
            return self.size
        if chain_length is None or chain_length < 1:
            raise ConfigError(f"scaffold '{self.name}' needs chain_length >= 1, got {chain_length}")
        return chain_length

    def smiles(self, n_sites: int, labels: Mapping[int, int]) -> str:
        """Backbone SMILES with ``[*:label]`` on site ``k`` for each ``k: label`` of ``labels``."""
        tokens = []
        for k in range(n_sites):
            tok = self.atom + ("1" if self.ring and k == 0 else "")
            if k in labels:
                tok += f"([*:{labels[k]}])"
            if self.ring and k == n_sites - 1:
                tok += "1"
            tokens.append(tok)
        return "".join(tokens)


DEFAULT_FRAGMENTS = (
    Fragment("carboxylic_acid", "*C(=O)O"),
    Fragment("hydroxyl", "*O"),
    Fragment("amine", "*N"),
    Fragment("nitro", "*[N+](=O)[O-]"),
    Fragment("aldehyde", "*C=O"),
    Fragment("nitrile", "*C#N"),
    Fragment("fluoro", "*F"),
    Fragment("chloro", "*Cl"),
)
DEFAULT_SCAFFOLDS = (
    Scaffold("benzene", "c", ring=True, size=6),
    Scaffold("cyclohexane", "C", ring=True, size=6),
    Scaffold("chain", "C", ring=False),
)


def _parse(smiles: str) -> Any:
    try:
        from rdkit import Chem
        from rdkit.rdBase import DisableLog
    except ImportError:
        raise ConfigError("fragment molecules need RDKit: pip install 'trustpot[xtb]'") from None

    DisableLog("rdApp.*")
    return Chem.MolFromSmiles(smiles)


@dataclass(frozen=True)
class MoleculeSpec:
    """One molecule of the generator.

    Attributes:
        smiles: canonical SMILES (RDKit), the key of its xTB frames.
        scaffold: scaffold name.
        chain_length: carbons of a chain scaffold; None for rings.
        fragments: ``(name, count)`` pairs with count > 0, sorted by name.
        sites: site of each placed fragment, ``(site, name)`` sorted by site.
        heavy_labels: [n_heavy] fragment name (or ``scaffold``) of each heavy atom, in the
            order of ``smiles``.
    """

    smiles: str
    scaffold: str
    chain_length: int | None
    fragments: tuple[tuple[str, int], ...]
    sites: tuple[tuple[int, str], ...]
    heavy_labels: tuple[str, ...]

    def count(self, name: str) -> int:
        """Copies of fragment ``name`` in the molecule."""
        return dict(self.fragments).get(name, 0)

    def info(self, names: Sequence[str]) -> dict[str, Any]:
        """``atoms.info`` annotations; ``names``: every fragment name of the library."""
        out: dict[str, Any] = {"scaffold": self.scaffold}
        if self.chain_length is not None:
            out["chain_length"] = int(self.chain_length)
        out["fragments"] = ",".join(n for n, _ in self.fragments) or "none"
        out.update({f"n_{n}": self.count(n) for n in names})
        out["smiles"] = self.smiles
        return out

    def atomic_numbers(self) -> np.ndarray:
        """[n_atoms] atomic numbers with hydrogens, in the xTB engine's atom order."""
        return np.array([a.GetAtomicNum() for a in _with_hydrogens(self.smiles).GetAtoms()])

    def atom_labels(self, names: Sequence[str]) -> np.ndarray:
        """[n_atoms] int: 0 scaffold, ``1 + names.index(fragment)``; H inherit their neighbour."""
        code = {"scaffold": SCAFFOLD_LABEL, **{n: k + 1 for k, n in enumerate(names)}}
        mol = _with_hydrogens(self.smiles)
        labels = np.zeros(mol.GetNumAtoms(), dtype=np.int64)
        for atom in mol.GetAtoms():
            k = atom.GetIdx()
            if k < len(self.heavy_labels):
                labels[k] = code[self.heavy_labels[k]]
            else:
                labels[k] = code[self.heavy_labels[atom.GetNeighbors()[0].GetIdx()]]
        return labels

    def elements(self) -> set[int]:
        """Atomic numbers present (hydrogen included)."""
        return {int(z) for z in self.atomic_numbers()}


def _with_hydrogens(smiles: str) -> Any:
    """The molecule as the xTB engine builds it (same parse, same ``AddHs``, same atom order)."""
    from rdkit import Chem

    mol = _parse(smiles)
    if mol is None:
        raise ConfigError(f"invalid SMILES '{smiles}'")
    return Chem.AddHs(mol)


class FragmentLibrary:
    """Fragments and scaffolds by name; the defaults, extensible with :meth:`add`.

    Args:
        fragments: the substituents (defaults: eight, :data:`DEFAULT_FRAGMENTS`).
        scaffolds: the backbones (defaults: benzene, cyclohexane, chain).
    """

    def __init__(
        self,
        fragments: Iterable[Fragment] = DEFAULT_FRAGMENTS,
        scaffolds: Iterable[Scaffold] = DEFAULT_SCAFFOLDS,
    ) -> None:
        self._fragments: dict[str, Fragment] = {}
        self._scaffolds: dict[str, Scaffold] = {}
        for f in fragments:
            self.add(f)
        for s in scaffolds:
            self.add_scaffold(s)

    def add(self, fragment: Fragment) -> FragmentLibrary:
        """Add a fragment (checked); returns the library."""
        fragment.check()
        if fragment.name in self._fragments or fragment.name == "scaffold":
            raise ConfigError(f"fragment name '{fragment.name}' is taken")
        self._fragments[fragment.name] = fragment
        return self

    def add_scaffold(self, scaffold: Scaffold) -> FragmentLibrary:
        """Add a scaffold; returns the library."""
        if scaffold.name in self._scaffolds:
            raise ConfigError(f"scaffold name '{scaffold.name}' is taken")
        if scaffold.ring and scaffold.size < 3:
            raise ConfigError(f"ring scaffold '{scaffold.name}' needs size >= 3")
        self._scaffolds[scaffold.name] = scaffold
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """Fragment names in library order (label ``k + 1`` is ``names[k]``)."""
        return tuple(self._fragments)

    @property
    def scaffolds(self) -> tuple[str, ...]:
        return tuple(self._scaffolds)

    def legend(self) -> dict[int, str]:
        """``fragment_label`` value -> name (0: scaffold)."""
        return {SCAFFOLD_LABEL: "scaffold", **{k + 1: n for k, n in enumerate(self.names)}}

    def fragment(self, name: str) -> Fragment:
        if name not in self._fragments:
            raise ConfigError(f"unknown fragment '{name}'; known: {', '.join(self.names)}")
        return self._fragments[name]

    def scaffold(self, name: str) -> Scaffold:
        if name not in self._scaffolds:
            raise ConfigError(f"unknown scaffold '{name}'; known: {', '.join(self.scaffolds)}")
        return self._scaffolds[name]

    def build(
        self, scaffold: str, placement: Mapping[int, str], chain_length: int | None = None
    ) -> MoleculeSpec:
        """The molecule with fragment ``placement[site]`` on each listed site.

        Raises:
            ConfigError: unknown names, a site out of range, or a product RDKit rejects.
        """
        from rdkit import Chem

        scaf = self.scaffold(scaffold)
        n = scaf.n_sites(chain_length)
        bad = [s for s in placement if not 0 <= s < n]
        if bad:
            raise ConfigError(f"site {bad[0]} out of range for {scaffold} with {n} sites")
        sites = sorted(placement)
        labels = {site: k + 1 for k, site in enumerate(sites)}
        pieces = [scaf.smiles(n, labels)]
        pieces += [self.fragment(placement[s]).labelled(labels[s]) for s in sites]
        mol = _parse(".".join(pieces))
        if mol is None:
            raise ConfigError(f"RDKit rejects the pieces {'.'.join(pieces)}")
        # tag every atom with its origin before zipping; the tags survive molzip
        for atom in mol.GetAtoms():
            atom.SetProp("origin", "scaffold")
        for frag_index, mol_atoms in enumerate(Chem.GetMolFrags(mol)):
            if frag_index == 0:
                continue
            for k in mol_atoms:
                mol.GetAtomWithIdx(k).SetProp("origin", placement[sites[frag_index - 1]])
        zipped = Chem.molzip(mol)
        try:
            Chem.SanitizeMol(zipped)
        except Exception as err:  # RDKit raises its own sanitisation exceptions
            raise ConfigError(
                f"{scaffold} with {dict(placement)}: invalid product: {err}"
            ) from None
        canonical = Chem.MolToSmiles(zipped)
        order = list(zipped.GetPropsAsDict(True, True)["_smilesAtomOutputOrder"])
        heavy = tuple(zipped.GetAtomWithIdx(int(k)).GetProp("origin") for k in order)
        again = _parse(canonical)
        if again is None or Chem.MolToSmiles(again) != canonical or "*" in canonical:
            raise ConfigError(f"{scaffold} with {dict(placement)}: product does not round-trip")
        if [a.GetSymbol() for a in again.GetAtoms()] != [
            zipped.GetAtomWithIdx(int(k)).GetSymbol() for k in order
        ]:
            raise ConfigError(f"{canonical}: atom order of the product is not reproducible")
        counts: dict[str, int] = {}
        for name in placement.values():
            counts[name] = counts.get(name, 0) + 1
        return MoleculeSpec(
            smiles=canonical,
            scaffold=scaffold,
            chain_length=None if scaf.ring else n,
            fragments=tuple(sorted(counts.items())),
            sites=tuple((s, placement[s]) for s in sites),
            heavy_labels=heavy,
        )

    def enumerate(
        self,
        scaffold: str,
        fragment_counts: Mapping[str, int],
        chain_length: int | None = None,
        sites: Sequence[int] | None = None,
    ) -> list[MoleculeSpec]:
        """Every distinct molecule (by canonical SMILES) with exactly ``fragment_counts`` on
        distinct sites of the scaffold (restricted to ``sites`` when given), in a fixed order.

        Raises:
            ConfigError: unknown names, negative counts, more fragments than sites.
        """
        for name, c in fragment_counts.items():
            self.fragment(name)
            if int(c) < 0:
                raise ConfigError(f"fragment count of '{name}' must be >= 0, got {c}")
        n = self.scaffold(scaffold).n_sites(chain_length)
        allowed = sorted(set(range(n) if sites is None else sites))
        if any(not 0 <= s < n for s in allowed):
            raise ConfigError(f"sites {list(allowed)} out of range for {scaffold} with {n} sites")
        multiset = sorted(name for name, c in fragment_counts.items() for _ in range(int(c)))
        if len(multiset) > len(allowed):
            raise ConfigError(
                f"{len(multiset)} fragments do not fit on {len(allowed)} sites of {scaffold}"
            )
        seen: dict[str, MoleculeSpec] = {}
        for chosen in itertools.combinations(allowed, len(multiset)):
            for names in sorted(set(itertools.permutations(multiset))):
                spec = self.build(scaffold, dict(zip(chosen, names)), chain_length)
                seen.setdefault(spec.smiles, spec)
        return list(seen.values())


_DEFAULT: list[FragmentLibrary] = []


def default_library() -> FragmentLibrary:
    """The default library (built on first use, so that importing this module needs no RDKit)."""
    if not _DEFAULT:
        _DEFAULT.append(FragmentLibrary())
    return _DEFAULT[0]


def __getattr__(name: str) -> Any:  # DEFAULT_LIBRARY, built lazily
    if name == "DEFAULT_LIBRARY":
        return default_library()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enumerate_molecules(
    scaffold: str,
    fragment_counts: Mapping[str, int],
    chain_length: int | None = None,
    sites: Sequence[int] | None = None,
    library: FragmentLibrary | None = None,
) -> list[MoleculeSpec]:
    """Distinct molecules of ``scaffold`` carrying ``fragment_counts`` (see
    :meth:`FragmentLibrary.enumerate`); the default library unless ``library`` is given.

    Example: ``enumerate_molecules("benzene", {"carboxylic_acid": 2})`` gives the ortho, meta
    and para diacids.
    """
    return (library or default_library()).enumerate(scaffold, fragment_counts, chain_length, sites)


def annotate_frames(
    source: str | Path,
    out: str | Path,
    specs: Iterable[MoleculeSpec],
    library: FragmentLibrary | None = None,
) -> int:
    """Copy the frames of ``source`` to ``out`` (atomically) with their fragment annotations.

    Frames are matched to molecules by their ``smiles`` provenance field (written by
    :func:`trustpot.engines.xtb.generate_molecules`); the atom order is checked against the
    molecule's. Returns the number of frames written.

    Raises:
        DataError: a frame without ``smiles``, of a molecule not in ``specs``, or whose
            atoms do not match its molecule.
    """
    from ase.io import iread, write

    library = library or default_library()
    by_smiles = {s.smiles: s for s in specs}
    numbers = {k: s.atomic_numbers() for k, s in by_smiles.items()}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for k, atoms in enumerate(iread(str(source), index=":", format="extxyz")):
            smiles = atoms.info.get("smiles")
            if smiles is None:
                raise DataError(str(source), "frame has no 'smiles' provenance", k, "smiles")
            spec = by_smiles.get(str(smiles))
            if spec is None:
                raise DataError(str(source), f"molecule {smiles} is not in the task", k, "smiles")
            if not np.array_equal(atoms.numbers, numbers[spec.smiles]):
                raise DataError(str(source), f"atoms do not match {smiles}", k, "numbers")
            atoms.info.update(spec.info(library.names))
            atoms.arrays["fragment_label"] = spec.atom_labels(library.names)
            write(handle, atoms, format="extxyz")
            n += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    return n
