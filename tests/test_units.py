"""Every constant of trustpot.units against its definition from CODATA 2014 values by hand."""

from __future__ import annotations

import math

import pytest

from trustpot import units as U
from trustpot.errors import ConfigError

# CODATA 2014 (the set ase.units uses by default)
E_CHARGE = 1.6021766208e-19  # C
AVOGADRO = 6.022140857e23  # 1/mol
C_LIGHT = 299792458.0  # m/s
MU0 = 4e-7 * math.pi  # N/A^2; eps0 = 1 / (mu0 c^2)


def test_kj_per_mol_in_ev() -> None:
    # 1 kJ/mol = 1000 J / N_A per particle = 1000 / (e N_A) eV ≈ 1 / 96.485332
    assert pytest.approx(1000.0 / (E_CHARGE * AVOGADRO), rel=1e-12) == U.KJ_PER_MOL_TO_EV
    assert pytest.approx(96.485332, rel=1e-7) == 1.0 / U.KJ_PER_MOL_TO_EV
    assert U.energy_factor("kJ/mol") == U.KJ_PER_MOL_TO_EV


def test_force_conversion_both_ways() -> None:
    # 1 kJ/mol/nm = (1 kJ/mol in eV) / (10 Å); the inverse is ≈ 964.8533 kJ/mol/nm per eV/Å
    assert pytest.approx(U.KJ_PER_MOL_TO_EV / 10.0, rel=1e-15) == U.KJ_PER_MOL_PER_NM_TO_EV_PER_A
    assert pytest.approx(E_CHARGE * AVOGADRO / 100.0, rel=1e-12) == U.EV_PER_A_IN_KJ_PER_MOL_PER_NM
    assert pytest.approx(964.8533, rel=1e-7) == U.EV_PER_A_IN_KJ_PER_MOL_PER_NM
    assert pytest.approx(1.0) == U.EV_PER_A_IN_KJ_PER_MOL_PER_NM * U.KJ_PER_MOL_PER_NM_TO_EV_PER_A


def test_coulomb_constant() -> None:
    # e^2 / (4 pi eps0 * 1 Å) in eV = e / (4 pi eps0) * 1e10 = e mu0 c^2 / (4 pi) * 1e10
    by_hand = E_CHARGE * MU0 * C_LIGHT**2 / (4 * math.pi) * 1e10
    assert pytest.approx(by_hand, rel=1e-9) == U.COULOMB_EV_A
    assert pytest.approx(14.399645, rel=1e-7) == U.COULOMB_EV_A


def test_unknown_units_are_refused() -> None:
    assert U.length_factor("nm") == 10.0
    with pytest.raises(ConfigError, match="unknown energy unit"):
        U.energy_factor("erg")
    with pytest.raises(ConfigError, match="unknown length unit"):
        U.length_factor("furlong")
