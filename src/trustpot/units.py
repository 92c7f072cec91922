"""Unit conversion at the edges: files may use other units, trustpot works in eV, Å and e."""

from __future__ import annotations

from typing import Final

from ase import units as ase_units

from trustpot.errors import ConfigError

#: Size of one unit in eV.
ENERGY_UNITS: Final[dict[str, float]] = {
    "eV": 1.0,
    "meV": 1e-3,
    "Hartree": ase_units.Hartree,
    "Ha": ase_units.Hartree,
    "kcal/mol": ase_units.kcal / ase_units.mol,
    "kJ/mol": ase_units.kJ / ase_units.mol,
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

#: Force of 1 eV/Å expressed in kJ/mol/nm (the unit seed 000 reports).
EV_PER_A_IN_KJ_PER_MOL_PER_NM: Final[float] = 1.0 / (ase_units.kJ / ase_units.mol) / 10.0


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
