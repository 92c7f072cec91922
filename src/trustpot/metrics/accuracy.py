"""Accuracy metrics of predicted energies and forces against reference labels.

Units follow the inputs (trustpot works in eV and eV/Å). Every function is tested against a
case computed by hand (``tests/test_metrics_accuracy.py``). Conventions:

- a force *MAE* is the mean of ``|F_pred - F_ref|`` over Cartesian components (not over atom
  norms), so every component weighs the same;
- structure-level functions take ``structures`` (labels in :class:`Structure`) and
  ``predictions`` (one ``{"energy": scalar, "forces": [n_atoms, 3]}`` mapping per structure, the
  format of :meth:`trustpot.calculator.Predictor.predict_structures`);
- a missing label gives NaN for that structure (per-structure metrics) or leaves the key out
  (summary metrics), never an error;
- a predicted property ``property:<name>`` (a fine-tuned model's property head) is compared
  with the value the frame stores under ``<name>`` (``info`` per structure, ``arrays`` per
  atom), in the unit the frames store it in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from trustpot import keys as K
from trustpot.data.structures import Structure

FloatArray = NDArray[np.float64]

#: Norms below this (eV/Å) have no direction: such atoms are left out of the force cosine.
MIN_FORCE_NORM = 1e-12


def as_float_array(x: Any) -> FloatArray:
    """``x`` (array, list, scalar, or a torch tensor) as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _mean_or_nan(x: FloatArray) -> float:
    return float(x.mean()) if x.size else float("nan")


def mae(errors: Any) -> float:
    """Mean absolute value of ``errors`` (any shape); NaN when empty."""
    e = as_float_array(errors)
    return float(np.abs(e).mean()) if e.size else float("nan")


def rmse(errors: Any) -> float:
    """Root mean square of ``errors`` (any shape); NaN when empty."""
    e = as_float_array(errors)
    return float(np.sqrt((e**2).mean())) if e.size else float("nan")


def force_mae(predicted: Any, reference: Any) -> float:
    """Force MAE of one structure: mean ``|F_pred - F_ref|`` over its components.

    Args:
        predicted: [n_atoms, 3] eV/Å.
        reference: [n_atoms, 3] eV/Å.

    Returns:
        MAE in eV/Å.
    """
    return float(np.abs(as_float_array(predicted) - as_float_array(reference)).mean())


def pooled_mae(errors: Iterable[Any]) -> float:
    """MAE over all components of several error arrays (every component weighs the same, so a
    large structure counts more than a small one); NaN when there is no component.

    Args:
        errors: per structure, e.g. [n_atoms, 3] predicted minus reference forces (eV/Å).
    """
    total, count = 0.0, 0
    for e in errors:
        a = as_float_array(e)
        total += float(np.abs(a).sum())
        count += int(a.size)
    return total / count if count else float("nan")


def per_structure_force_mae(
    structures: Sequence[Structure], predictions: Sequence[Mapping[str, Any]]
) -> FloatArray:
    """[n_structures] force MAE (eV/Å) of each structure, NaN where it has no force labels.

    Args:
        structures: reference structures (``forces`` [n_atoms, 3] eV/Å or None).
        predictions: per structure, a mapping with ``forces`` [n_atoms, 3] eV/Å.
    """
    if len(structures) != len(predictions):
        raise ValueError(f"{len(structures)} structures but {len(predictions)} predictions")
    return np.array(
        [
            float("nan") if s.forces is None else force_mae(p[K.FORCES], s.forces)
            for s, p in zip(structures, predictions)
        ],
        dtype=np.float64,
    )


def force_cosines(predicted: Any, reference: Any) -> FloatArray:
    """Cosine between predicted and reference force of each atom whose two forces are both
    longer than :data:`MIN_FORCE_NORM`.

    Args:
        predicted, reference: [n_atoms, 3] eV/Å.

    Returns:
        [n_valid] cosines in [-1, 1] (atoms with a vanishing force are left out).
    """
    pf, rf = as_float_array(predicted), as_float_array(reference)
    pn, rn = np.linalg.norm(pf, axis=1), np.linalg.norm(rf, axis=1)
    valid = (pn > MIN_FORCE_NORM) & (rn > MIN_FORCE_NORM)
    cos: FloatArray = (pf * rf).sum(1)[valid] / (pn[valid] * rn[valid])
    return cos


def force_magnitude_errors(predicted: Any, reference: Any) -> FloatArray:
    """[n_atoms] ``| |F_pred| - |F_ref| |`` per atom (eV/Å), from [n_atoms, 3] forces."""
    pf, rf = as_float_array(predicted), as_float_array(reference)
    diff: FloatArray = np.abs(np.linalg.norm(pf, axis=1) - np.linalg.norm(rf, axis=1))
    return diff


def property_reference(s: Structure, key: str, predicted: FloatArray) -> FloatArray | None:
    """The value ``s`` stores for the predicted property ``key`` (``property:<name>``), shaped
    as ``predicted``: ``info[name]`` or ``arrays[name]``, whichever has as many values; None
    when neither does."""
    name = key.removeprefix(K.PROPERTY_PREFIX)
    for stored in (s.info.get(name), s.arrays.get(name)):
        if stored is None:
            continue
        try:
            ref = np.asarray(stored, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if ref.size == predicted.size:
            return ref.reshape(predicted.shape)
    return None


def property_metrics(
    structures: Sequence[Structure], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """``<key>_mae``, ``<key>_rmse`` (over every component, in the property's unit) and
    ``<key>_n`` (structures compared) of each predicted property ``key`` (``property:<name>``)
    that some structure stores (:func:`property_reference`); empty without one."""
    errors: dict[str, list[FloatArray]] = {}
    for s, p in zip(structures, predictions):
        for key, value in p.items():
            if not key.startswith(K.PROPERTY_PREFIX):
                continue
            pred = as_float_array(value)
            ref = property_reference(s, key, pred)
            if ref is not None:
                errors.setdefault(key, []).append((pred - ref).ravel())
    out: dict[str, float] = {}
    for key, parts in sorted(errors.items()):
        e = np.concatenate(parts)
        out.update({f"{key}_mae": mae(e), f"{key}_rmse": rmse(e), f"{key}_n": len(parts)})
    return out


def accuracy_metrics(
    structures: Sequence[Structure], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Energy and force errors (eV, eV/Å) over structures that carry the labels.

    Returns ``energy_mae``, ``energy_rmse`` (per structure), ``energy_mae_per_atom``,
    ``energy_rmse_per_atom``, ``forces_mae`` and ``forces_rmse`` (per component),
    ``forces_cosine`` (mean over atoms of the cosine between predicted and reference force,
    :func:`force_cosines`; NaN when no atom has a force), ``forces_magnitude_mae`` (per atom),
    ``forces_tail_share`` (:func:`tail_share` of the structures' squared force errors: near
    0.05 when errors are spread evenly, near 1 when a few structures make the RMSE),
    ``n_structures``, ``n_atoms``; force keys are absent when no structure has forces, energy
    keys when none has energies; and the errors of predicted properties
    (:func:`property_metrics`).
    """
    out: dict[str, float] = {"n_structures": len(structures)}
    e_err: list[float] = []
    e_err_pa: list[float] = []
    f_err: list[FloatArray] = []
    cos: list[FloatArray] = []
    mag: list[FloatArray] = []
    n_atoms = 0
    for s, p in zip(structures, predictions):
        n_atoms += s.n_atoms
        if s.energy is not None:
            e_err.append(float(p[K.ENERGY]) - s.energy)
            e_err_pa.append(e_err[-1] / s.n_atoms)
        if s.forces is not None and K.FORCES in p:
            pf, rf = as_float_array(p[K.FORCES]), s.forces
            f_err.append((pf - rf).ravel())
            cos.append(force_cosines(pf, rf))
            mag.append(force_magnitude_errors(pf, rf))
    out["n_atoms"] = n_atoms
    if e_err:
        e, epa = np.array(e_err), np.array(e_err_pa)
        out.update(
            energy_mae=mae(e),
            energy_rmse=rmse(e),
            energy_mae_per_atom=mae(epa),
            energy_rmse_per_atom=rmse(epa),
        )
    if f_err:
        f = np.concatenate(f_err)
        out.update(
            forces_mae=mae(f),
            forces_rmse=rmse(f),
            forces_cosine=_mean_or_nan(np.concatenate(cos)),
            forces_magnitude_mae=_mean_or_nan(np.concatenate(mag)),
            forces_tail_share=tail_share(np.array([np.sum(e**2) for e in f_err])),
        )
    out.update(property_metrics(structures, predictions))
    return out


def tail_share(squared: FloatArray, fraction: float = 0.05) -> float:
    """The share of ``sum(squared)`` carried by its largest ``fraction`` of entries (at least
    one): how much of an RMSE a few structures make. NaN for an empty or all-zero input."""
    total = float(np.sum(squared))
    if squared.size == 0 or total <= 0.0:
        return float("nan")
    k = max(1, math.ceil(fraction * squared.size))
    return float(np.sort(squared)[::-1][:k].sum() / total)


def grouped_metrics(
    structures: Sequence[Structure],
    predictions: Sequence[Mapping[str, Any]],
    key: str = "config_type",
) -> dict[str, dict[str, float]]:
    """:func:`accuracy_metrics` per value of ``info[key]`` (only frames that have it), sorted
    by that value; empty when no frame has it."""
    groups: dict[str, list[int]] = {}
    for k, s in enumerate(structures):
        if key in s.info:
            groups.setdefault(str(s.info[key]), []).append(k)
    return {
        name: accuracy_metrics([structures[i] for i in idx], [predictions[i] for i in idx])
        for name, idx in sorted(groups.items())
    }
