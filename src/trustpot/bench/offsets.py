"""Which part of an energy error is an offset.

A potential's energy is ``sum_i E0[z_i] + learned``; the reference energies ``E0`` are fitted
by least squares to the training compositions. When the test molecules have compositions that
training never had (two carboxylic acids instead of one, a nitrile instead of an amine), an
error in ``E0`` of an element, or a constant energy per atom that the network learned for an
environment, turns into an energy error that grows with the count of that element: large in eV,
yet harmless for forces and for energy *differences* between conformers of one molecule.

:func:`energy_offset_analysis` splits the signed errors ``e_s = E_pred - E_ref`` [S] (eV) of a
test set into

* an **offset**: the mean error of each molecule (frames grouped by their ``smiles`` info, else
  by composition), constant over that molecule's conformers; ``offset_mae`` is its MAE over
  structures, ``bias`` the mean signed error over all structures;
* the **rest** ``e_s - offset(molecule of s)``: the error in energy *differences* between
  conformers of one molecule, what MD and forces feel; ``mae_rest`` is its MAE.

Whether the offsets are explained by a per-element energy (as a wrong reference energy ``E0``
would produce) is measured by the least-squares ``delta`` [n_elements] (eV per atom of each
element) with ``offsets ~ sum_z n_z delta_z``: ``element_share`` is the share of the offsets'
squared size it explains. This says something only when the test set has more distinct
compositions than elements (``element_fit_determined``); otherwise a per-element fit explains
any offsets exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trustpot.data.structures import Structure
from trustpot.metrics.accuracy import mae


def energy_offset_analysis(
    structures: Sequence[Structure], predicted: Sequence[float]
) -> dict[str, Any]:
    """Offset (per-molecule constant) and rest (conformational) parts of energy errors.

    Args:
        structures: labelled structures (those without an energy are skipped).
        predicted: predicted energies (eV), one per structure.

    Returns:
        ``energy_mae``, ``energy_bias`` (mean signed error), ``offset_mae``, ``mae_rest`` (all
        eV), ``offset_share`` (share of the summed squared error that is offset, 0..1),
        ``offset_per_molecule`` ({molecule: eV}), ``offset_per_element`` ({symbol: eV per
        atom}), ``element_share`` (0..1), ``element_fit_determined``, ``n_molecules``,
        ``n_compositions``; an empty dict without energies.
    """
    from ase.data import chemical_symbols

    labelled = [(s, float(p), s.energy) for s, p in zip(structures, predicted)]
    rows = [(s, p) for s, p, e in labelled if e is not None]
    if not rows:
        return {}
    errors = np.array([p - e for _, p, e in labelled if e is not None])
    elements = sorted({int(z) for s, _ in rows for z in s.numbers})
    column = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(rows), len(elements)))
    for r, (s, _) in enumerate(rows):
        for z in s.numbers:
            counts[r, column[int(z)]] += 1
    keys = [
        str(s.info.get("smiles") or tuple(counts[r].astype(int).tolist()))
        for r, (s, _) in enumerate(rows)
    ]
    groups: dict[str, list[int]] = {}
    for r, key in enumerate(keys):
        groups.setdefault(key, []).append(r)
    offset = np.zeros_like(errors)
    for idx in groups.values():
        offset[idx] = errors[idx].mean()
    rest = errors - offset
    sse = float((errors**2).sum())
    n_comp = len({tuple(r) for r in counts.astype(int).tolist()})
    delta, *_ = np.linalg.lstsq(counts, offset, rcond=None)
    o_sq = float((offset**2).sum())
    element_share = 1.0 - float(((offset - counts @ delta) ** 2).sum()) / o_sq if o_sq > 0 else 0.0
    return {
        "energy_mae": mae(errors),
        "energy_bias": float(errors.mean()),
        "offset_mae": mae(offset),
        "mae_rest": mae(rest),
        "offset_share": 1.0 - float((rest**2).sum()) / sse if sse > 0 else 0.0,
        "offset_per_molecule": {k: float(errors[idx].mean()) for k, idx in groups.items()},
        "offset_per_element": {chemical_symbols[z]: float(delta[column[z]]) for z in elements},
        "element_share": min(max(element_share, 0.0), 1.0),
        "element_fit_determined": n_comp > len(elements),
        "n_molecules": len(groups),
        "n_compositions": n_comp,
    }
