"""Choosing which visited frames to label: scores, top-k, farthest-point sampling, random.

A round of ``trustpot learn`` visits many frames by MD; each gets a **score** from the
reliability wrapper's outputs (higher: less trusted). Selection keeps the ``pool`` highest
scores, then picks ``k`` of them by **farthest-point sampling** (FPS) in a per-structure
embedding space, starting from the highest score: each next pick is the pool frame farthest
(Euclidean) from every frame picked so far, so that ``k`` near-copies of one uncertain
configuration (consecutive MD frames) are not all labelled. With ``pool == k`` it is plain top-k.

A structure's **descriptor** is built from the model's per-atom invariant features
(``Model.embed(g)["node"]`` [n_atoms, F]): for each element the model knows, the mean feature of
that element's atoms (zeros when the structure has none), concatenated to [n_species * F].
Structures of different compositions are thus far apart, and two frames of one molecule differ
by how their atoms' environments differ.

Everything here is NumPy on plain arrays (no model, no files), so it is tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trustpot import keys as K
from trustpot.errors import ConfigError

#: Score kinds: how a frame's uncertainty outputs become one number (higher: less trusted).
SCORES: dict[str, str] = {
    "max-std": "largest per-atom forces_std of the frame, eV/Å",
    "mean-std": "mean per-atom forces_std of the frame, eV/Å",
    "reliability": "1 - reliability (probability that the frame's force MAE is above tolerance)",
}


def score_outputs(kind: str) -> frozenset[str]:
    """The model outputs :func:`frame_score` reads for ``kind``."""
    if kind not in SCORES:
        raise ConfigError(f"unknown score '{kind}'; known: {', '.join(SCORES)}")
    return frozenset({K.RELIABILITY} if kind == "reliability" else {K.FORCES_STD_RAW})


def frame_score(prediction: Mapping[str, Any], kind: str) -> float:
    """One frame's score from a prediction (``forces_std_raw`` or ``forces_std`` [n_atoms]
    eV/Å, ``reliability``).

    The std scores read the wrapper's std before recalibration when the prediction has it:
    recalibration, ``sqrt((a std)^2 + b^2)``, is monotone, so both rank frames alike, except
    that a fitted scale ``a`` near 0 (few calibration frames) turns every calibrated std into
    the floor ``b`` and would erase the ranking.

    Raises:
        ConfigError: unknown ``kind``, or the prediction lacks the output it needs.
    """
    if kind not in SCORES:
        raise ConfigError(f"unknown score '{kind}'; known: {', '.join(SCORES)}")
    if kind == "reliability":
        if K.RELIABILITY not in prediction:
            raise ConfigError("--score reliability: the model gives no reliability")
        return 1.0 - float(prediction[K.RELIABILITY])
    key = K.FORCES_STD_RAW if K.FORCES_STD_RAW in prediction else K.FORCES_STD
    if key not in prediction:
        raise ConfigError(f"--score {kind}: the model gives no forces_std")
    std = np.asarray(prediction[key], dtype=np.float64)
    return float(std.max() if kind == "max-std" else std.mean())


def top_k(scores: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, highest first (ties: lower index first; NaN last).

    Args:
        scores: [n] scores.
        k: how many (fewer when there are fewer scores).
    """
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.arange(len(s)), -key))  # last key sorts first: by -score, then index
    return [int(i) for i in order[: max(k, 0)]]


def farthest_point_sampling(points: np.ndarray, k: int, first: int = 0) -> list[int]:
    """``k`` row indices of ``points`` [n, d], each the farthest from those picked before.

    Args:
        points: [n, d] descriptors (any unit; Euclidean distance).
        k: how many (all ``n`` when ``k >= n``).
        first: the index picked first.

    Returns:
        Indices in the order picked; ties go to the lower index, so the result is deterministic.
    """
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    if n == 0 or k <= 0:
        return []
    if not 0 <= first < n:
        raise ValueError(f"first={first} is not a row of {n} points")
    picked = [first]
    nearest = np.linalg.norm(x - x[first], axis=1)
    while len(picked) < min(k, n):
        nearest[picked] = -1.0
        nxt = int(np.argmax(nearest))
        picked.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[nxt], axis=1))
    return picked


def pool_size(k: int, pool_factor: float) -> int:
    """Candidates that FPS chooses among: ``ceil(pool_factor * k)``, at least ``k``."""
    return max(k, math.ceil(pool_factor * k))


def select_diverse(
    scores: Sequence[float] | np.ndarray, descriptors: np.ndarray, k: int, pool_factor: float
) -> list[int]:
    """``k`` frames: FPS among the :func:`pool_size` highest scores, from the highest one.

    Args:
        scores: [n] scores (higher: less trusted).
        descriptors: [n, d] structure descriptors (:func:`structure_descriptors`).
        k: frames to select.
        pool_factor: the pool is ``ceil(pool_factor * k)`` frames (plain top-k when <= 1).

    Returns:
        Indices into ``scores``, in the order picked.
    """
    pool = top_k(scores, pool_size(k, pool_factor))
    if not pool:
        return []
    x = np.asarray(descriptors, dtype=np.float64)
    if x.shape[0] != len(scores):
        raise ValueError(f"{x.shape[0]} descriptors for {len(scores)} scores")
    return [pool[i] for i in farthest_point_sampling(x[pool], k, first=0)]


def select_random(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``n`` indices drawn uniformly without replacement (seeded), in drawn order."""
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.permutation(n)[: max(min(k, n), 0)]]


def structure_descriptors(
    embeddings: Sequence[np.ndarray], numbers: Sequence[np.ndarray], species: Sequence[int]
) -> np.ndarray:
    """Per-structure descriptors from per-atom features (module docstring).

    Args:
        embeddings: per structure, [n_atoms, F] invariant per-atom features.
        numbers: per structure, [n_atoms] atomic numbers.
        species: the atomic numbers the model knows (the descriptor's blocks, in this order).

    Returns:
        [n_structures, len(species) * F] float64.
    """
    if not embeddings:
        return np.zeros((0, 0))
    width = int(np.asarray(embeddings[0]).shape[1])
    out = np.zeros((len(embeddings), len(species) * width))
    for row, (emb, z) in enumerate(zip(embeddings, numbers)):
        e, z = np.asarray(emb, dtype=np.float64), np.asarray(z)
        for block, element in enumerate(species):
            mask = z == element
            if mask.any():
                out[row, block * width : (block + 1) * width] = e[mask].mean(axis=0)
    return out
