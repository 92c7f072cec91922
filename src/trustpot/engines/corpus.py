"""The ``trustpot-mol`` corpus: small organic molecules sampled with GFN2-xTB.

:data:`FAMILIES` lists 243 neutral, closed-shell molecules of 3 to 20 heavy atoms made of H, C,
N, O, F, S and Cl, grouped by chemical family (hydrocarbons, alcohols, ethers, carbonyls,
acids, esters, amines, amides, nitriles and nitro compounds, aromatics, heterocycles, fluorides,
chlorides, sulfur compounds, multifunctional molecules). Every SMILES parses in RDKit and the
list holds each molecule once (by canonical SMILES; ``tests/test_corpus.py``). Acetylacetone
(pentane-2,4-dione) and its enol are deliberately absent: they are kept out of the pretraining
data so that they remain an unseen molecule for downstream tests.

:func:`generate_corpus` samples the chosen molecules by Langevin MD with GFN2-xTB forces through
the xTB engine (:func:`trustpot.engines.xtb.generate_molecules`, resumable), with
``properties=True``: every frame carries energy (eV), forces (eV/Å), the HOMO-LUMO gap
(``atoms.info["homo_lumo_gap"]``, eV), the dipole (``atoms.info["xtb_dipole"]``, [3] e·Å), the
Mulliken partial charges (``atoms.arrays["xtb_charges"]``, [n_atoms] e) and its provenance
(``smiles``, ``temperature`` in K, ``seed`` of its trajectory, ``md_step``, ``frame_id``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.engines.labelling import RunSummary
from trustpot.errors import ConfigError

#: Molecules of the corpus by family (SMILES; hydrogens are implicit).
FAMILIES: dict[str, tuple[str, ...]] = {
    "hydrocarbons": (
        "CCC",
        "CCCC",
        "CC(C)C",
        "CCCCC",
        "CC(C)(C)C",
        "CCCCCC",
        "C1CCCC1",
        "C1CCCCC1",
        "CC1CCCCC1",
        "C1CC1",
        "C=CC",
        "C=CCC",
        "CC=CC",
        "C=CC=C",
        "CC(=C)C",
        "C#CC",
        "CC#CC",
        "C1=CCCCC1",
        "C1CCC2CCCCC2C1",
        "C12CC3CC(C1)CC(C3)C2",
    ),
    "alcohols": (
        "CCO",
        "CCCO",
        "CC(C)O",
        "CCCCO",
        "CC(C)(C)O",
        "OCCO",
        "OCC(O)CO",
        "C1CCC(O)CC1",
        "OCc1ccccc1",
        "C=CCO",
        "CC(O)CC",
        "OCCCCO",
    ),
    "ethers": (
        "COC",
        "CCOCC",
        "C1CCOC1",
        "C1CCOCC1",
        "C1COCCO1",
        "COCCOC",
        "COc1ccccc1",
        "CC(C)OC(C)C",
        "C1CO1",
    ),
    "aldehydes and ketones": (
        "CC=O",
        "CCC=O",
        "O=Cc1ccccc1",
        "CC(C)=O",
        "CCC(C)=O",
        "O=C1CCCC1",
        "O=C1CCCCC1",
        "CC(=O)c1ccccc1",
        "C=CC=O",
        "CC(=O)C(C)=O",
        "O=CC=O",
        "CC(C)CC(C)=O",
    ),
    "acids": (
        "OC=O",
        "CC(=O)O",
        "CCC(=O)O",
        "CC(C)C(=O)O",
        "OC(=O)c1ccccc1",
        "OC(=O)CC(=O)O",
        "OC(=O)C(=O)O",
        "C=CC(=O)O",
        "OCC(=O)O",
        "CC(O)C(=O)O",
    ),
    "esters": (
        "COC=O",
        "CC(=O)OC",
        "CCOC(C)=O",
        "COC(=O)c1ccccc1",
        "CC(=O)OC(C)(C)C",
        "O=C1CCCO1",
        "O=C1CCO1",
        "COC(=O)C=C",
        "CCOC(=O)CC(=O)OCC",
    ),
    "amines": (
        "CCN",
        "CNC",
        "CN(C)C",
        "CCCN",
        "CC(C)N",
        "NCCN",
        "C1CCNC1",
        "C1CCNCC1",
        "C1COCCN1",
        "Nc1ccccc1",
        "CNc1ccccc1",
        "NCc1ccccc1",
        "CCN(CC)CC",
        "NCCO",
        "C1CNCCN1",
    ),
    "amides, ureas, carbamates": (
        "NC=O",
        "CC(N)=O",
        "CNC(C)=O",
        "CN(C)C=O",
        "CN(C)C(C)=O",
        "NC(=O)c1ccccc1",
        "O=C1CCCN1",
        "O=C1CCCCN1",
        "NC(N)=O",
        "CNC(=O)NC",
        "COC(N)=O",
        "CC(=O)Nc1ccccc1",
        "O=C1NC(=O)CC1",
    ),
    "nitriles, nitro, imines, oximes": (
        "CC#N",
        "CCC#N",
        "N#Cc1ccccc1",
        "C=CC#N",
        "N#CCC#N",
        "N#CCO",
        "C[N+](=O)[O-]",
        "CC[N+](=O)[O-]",
        "O=[N+]([O-])c1ccccc1",
        "CC(C)=NO",
        "CC=NC",
    ),
    "aromatics": (
        "c1ccccc1",
        "Cc1ccccc1",
        "Cc1ccccc1C",
        "Cc1ccc(C)cc1",
        "CCc1ccccc1",
        "C=Cc1ccccc1",
        "c1ccc2ccccc2c1",
        "c1ccc(cc1)-c1ccccc1",
        "Oc1ccccc1",
        "Cc1ccc(O)cc1",
        "Oc1ccccc1O",
        "COc1ccc(C=O)cc1",
        "Nc1ccc(cc1)C(=O)O",
        "CC(C)c1ccccc1",
    ),
    "heterocycles": (
        "c1ccncc1",
        "Cc1ccccn1",
        "c1cnccn1",
        "c1cncnc1",
        "c1ccnnc1",
        "c1cc[nH]c1",
        "c1ccoc1",
        "c1ccsc1",
        "c1c[nH]cn1",
        "c1cn[nH]c1",
        "c1cocn1",
        "c1cscn1",
        "c1conc1",
        "Cc1ccco1",
        "O=Cc1ccco1",
        "c1ccc2[nH]ccc2c1",
        "c1ccc2ncccc2c1",
        "c1ccc2occc2c1",
        "c1ccc2sccc2c1",
        "c1ccc2[nH]cnc2c1",
        "Nc1ncccn1",
        "O=c1cc[nH]c(=O)[nH]1",
        "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
        "c1nc[nH]n1",
        "Cc1ncc[nH]1",
        "c1ccc(nc1)C#N",
        "Oc1ccncc1",
        "O=c1cccc[nH]1",
        "C1CCSC1",
        "C1CSCCS1",
        "C1CCOC(=O)C1",
    ),
    "fluorides": (
        "CCF",
        "FC(F)F",
        "FC(F)(F)F",
        "CC(F)(F)F",
        "OCC(F)(F)F",
        "Fc1ccccc1",
        "Fc1ccc(F)cc1",
        "FC(F)(F)c1ccccc1",
        "Fc1ccccc1O",
        "CC(=O)F",
        "FC(F)C(F)(F)F",
        "Fc1ccncc1",
        "OC(=O)C(F)(F)F",
        "Fc1c(F)c(F)c(F)c(F)c1F",
        "NCCF",
    ),
    "chlorides": (
        "ClCCl",
        "ClC(Cl)Cl",
        "CCCl",
        "CC(C)Cl",
        "ClCCCl",
        "ClC=C",
        "ClC=CCl",
        "Clc1ccccc1",
        "Clc1ccc(Cl)cc1",
        "CC(=O)Cl",
        "ClCC(=O)O",
        "ClCC#N",
        "Clc1ccccn1",
        "Clc1ccc(O)cc1",
        "Clc1ccc(F)cc1",
        "ClC(Cl)=C(Cl)Cl",
        "CC(Cl)C(=O)OC",
        "FC(F)(Cl)Cl",
        "ClCc1ccccc1",
    ),
    "sulfur compounds": (
        "CCS",
        "CC(C)S",
        "SCCO",
        "Sc1ccccc1",
        "CSC",
        "CCSCC",
        "CSc1ccccc1",
        "CSSC",
        "CSCCO",
        "CS(C)=O",
        "CCS(=O)CC",
        "C1CCS(=O)C1",
        "CS(C)(=O)=O",
        "C1CCS(=O)(=O)C1",
        "CS(N)(=O)=O",
        "CS(=O)(=O)O",
        "Cc1ccc(cc1)S(N)(=O)=O",
        "NC(=S)N",
        "CC(N)=S",
        "CSC#N",
        "C=CCSSCC=C",
        "S=C=S",
        "CSC(=O)C",
        "OC(=O)CS",
        "NC(CS)C(=O)O",
    ),
    "amino acids and multifunctional": (
        "NCC(=O)O",
        "CC(N)C(=O)O",
        "CC(C)C(N)C(=O)O",
        "OCC(N)C(=O)O",
        "CSCCC(N)C(=O)O",
        "NC(=O)CC(N)C(=O)O",
        "CC(=O)OCC(=O)C",
        "OC1CCOC1",
        "CC(=O)CCC(=O)O",
        "O=C(O)c1ccccc1O",
        "CC(=O)Oc1ccccc1C(=O)O",
        "CC(=O)Nc1ccc(O)cc1",
        "COc1cc(C=O)ccc1O",
        "OC(=O)C=CC(=O)O",
        "NS(=O)(=O)c1ccc(N)cc1",
        "CN1CCCC1c1cccnc1",
        "OCC1OC(O)C(O)C(O)C1O",
        "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
        "ClC(Cl)(Cl)C(O)O",
        "Oc1ccc(Cl)cc1Cl",
        "FC(F)(F)C(=O)c1ccccc1",
        "N#Cc1ccc(F)cc1",
        "CC(C)(O)C#N",
        "O=C(Cl)c1ccccc1",
        "COCC(=O)OC",
        "CCOC(=O)N",
        "CC1=CC(=O)CC(C)(C)C1",
        "C1=CC=CC=CC=C1",
    ),
}

#: Every corpus SMILES, in family order.
CORPUS: tuple[str, ...] = tuple(s for family in FAMILIES.values() for s in family)

#: Molecules kept out of the corpus on purpose (acetylacetone, keto and enol forms).
EXCLUDED: tuple[str, ...] = ("CC(=O)CC(C)=O", "CC(O)=CC(C)=O")


@dataclasses.dataclass(frozen=True)
class CorpusOptions:
    """What the corpus holds; every field shapes the data (a rerun with others is refused).

    Attributes:
        molecules: SMILES to sample instead of the whole :data:`CORPUS` (empty: all of it).
        limit: keep at most this many of them, evenly spread over the list so every family
            stays represented (0: all).
        temperatures: Langevin temperatures, K.
        frames: frames per (molecule, temperature), all from one trajectory.
        seed: run seed; every trajectory's seed derives from it.
        equilibration: MD steps before the first kept frame.
        interval: MD steps between kept frames.
        timestep: fs.
        friction: Langevin friction, 1/fs.
    """

    molecules: tuple[str, ...] = ()
    limit: int = 0
    temperatures: tuple[float, ...] = (300.0, 600.0, 900.0)
    frames: int = 8
    seed: int = 0
    equilibration: int = 200
    interval: int = 25
    timestep: float = 0.5
    friction: float = 0.01

    def check(self) -> None:
        if self.limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {self.limit}")
        if self.frames < 1:
            raise ConfigError(f"--frames must be >= 1, got {self.frames}")

    def md(self) -> Any:
        """The xTB engine's :class:`~trustpot.engines.xtb.MDOptions` (one trajectory per
        (molecule, temperature))."""
        from trustpot.engines.xtb import MDOptions

        return MDOptions(
            timestep=self.timestep,
            friction=self.friction,
            equilibration=self.equilibration,
            interval=self.interval,
            chunk=self.frames,
        )


def corpus_smiles(options: CorpusOptions) -> list[str]:
    """The SMILES ``options`` select, in corpus order."""
    options.check()
    chosen = list(options.molecules) if options.molecules else list(CORPUS)
    if options.limit and options.limit < len(chosen):
        picks = np.unique(np.linspace(0, len(chosen) - 1, options.limit).round().astype(int))
        chosen = [chosen[int(i)] for i in picks]
    return chosen


def generate_corpus(
    out: str | Path, options: CorpusOptions = CorpusOptions(), workers: int = 1,
    progress: bool = True,
) -> RunSummary:  # fmt: skip
    """Sample the corpus into the extended XYZ file ``out`` (resumable, see
    :mod:`trustpot.engines.labelling`): ``len(molecules) * len(temperatures) * frames`` frames
    with energies, forces, gap, dipole and partial charges (module docstring).

    Raises:
        ConfigError: bad options, invalid SMILES, or the ``xtb`` extra missing.
    """
    from trustpot.engines.xtb import generate_molecules

    return generate_molecules(
        corpus_smiles(options),
        options.temperatures,
        options.frames,
        out,
        seed=options.seed,
        workers=workers,
        method="GFN2-xTB",
        md=options.md(),
        progress=progress,
        properties=True,
    )
