"""Unit conversion at the edges: files may use other units, trustpot works in eV, Å and e."""

from __future__ import annotations

from typing import Final

from ase import units as ase_units

from trustpot.errors import ConfigError

# Every physical constant of trustpot is defined here, once, from one source: ``ase.units``
# (CODATA 2014, ASE's default set). Other modules import these names instead of writing numbers.

#: 1 kJ/mol in eV (≈ 1 / 96.485332).
KJ_PER_MOL_TO_EV: Final[float] = ase_units.kJ / ase_units.mol
#: 1 kJ/mol/nm in eV/Å (1 nm = 10 Å), the factor that turns OpenMM forces into trustpot forces.
KJ_PER_MOL_PER_NM_TO_EV_PER_A: Final[float] = KJ_PER_MOL_TO_EV / 10.0
#: 1 eV/Å in kJ/mol/nm (≈ 964.8533), the unit seed 000 reports forces in.
EV_PER_A_IN_KJ_PER_MOL_PER_NM: Final[float] = 1.0 / KJ_PER_MOL_PER_NM_TO_EV_PER_A
#: Coulomb constant e² / (4π ε0) in eV·Å/e² (≈ 14.399645): Hartree × Bohr in atomic units.
COULOMB_EV_A: Final[float] = ase_units.Hartree * ase_units.Bohr

#: Size of one unit in eV.
ENERGY_UNITS: Final[dict[str, float]] = {
    "eV": 1.0,
    "meV": 1e-3,
    "Hartree": ase_units.Hartree,
    "Ha": ase_units.Hartree,
    "kcal/mol": ase_units.kcal / ase_units.mol,
    "kJ/mol": KJ_PER_MOL_TO_EV,
    "Ry": ase_units.Rydberg,
}

#: Size of one unit in Å.
LENGTH_UNITS: Final[dict[str, float]] = {
    "Å": 1.0,
    "A": 1.0,
    "Angstrom": 1.0,
    "Bohr": ase_units.Bohr,
    "nm": 10.0,
}


def energy_factor(unit: str) -> float:
    """Factor that turns an energy in ``unit`` into eV."""
    try:
        return ENERGY_UNITS[unit]
    except KeyError:
        raise ConfigError(
            f"unknown energy unit '{unit}'; known: {', '.join(ENERGY_UNITS)}"
        ) from None


def length_factor(unit: str) -> float:
    """Factor that turns a length in ``unit`` into Å."""
    try:
        return LENGTH_UNITS[unit]
    except KeyError:
        raise ConfigError(
            f"unknown length unit '{unit}'; known: {', '.join(LENGTH_UNITS)}"
        ) from None
