"""``trustpot pretrain``: build trustpot's own pretrained molecular model, ``trustpot-mol``.

One command, five steps, each a folder of ``OUT`` reused on a rerun when done with the same
settings (:func:`trustpot.train.reuse.run_step`)::

    trustpot pretrain --out /tmp/trustpot-mol --minutes 25

1. ``corpus/``: the GFN2-xTB corpus (:mod:`trustpot.engines.corpus`), ``corpus.xyz``; resumed
   frame by frame when interrupted.
2. ``data/``: ``manifest.json`` (SMILES, temperatures, frames, run and trajectory seeds, corpus
   options, the data file's SHA-256, versions) and ``split.json`` (a trustpot split manifest:
   ``train`` and ``test`` hold whole molecules; the test molecules are never trained on).
3. ``train/``: PaiNN trained by :func:`trustpot.train.run.run_training` on ``split.json:train``
   (a random share of those frames validates), within a wall-clock budget.
4. ``eval/``: errors on the held-out molecules: overall, per element (forces) and per
   temperature; ``card.md`` and ``card.json`` in ``OUT``.
5. ``OUT/trustpot-mol.ckpt``: the best epoch's weights, an ordinary trustpot potential.

Errors are in meV/atom (energy) and meV/Å (force components).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.engines.corpus import CorpusOptions, corpus_smiles, generate_corpus
from trustpot.errors import ConfigError
from trustpot.options import option
from trustpot.train.reuse import run_step

NAME = "trustpot-mol"
CARD_KEYS = ("energy_mae", "forces_mae", "forces_rmse")


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
    """``trustpot pretrain``: corpus, split and training settings of ``trustpot-mol``."""

    out: str = option("", "output folder; a rerun reuses its finished steps", required=True)
    molecules: tuple[str, ...] = option(
        (), "SMILES to use instead of the whole corpus", metavar="SMILES"
    )
    limit: int = option(0, "use at most this many molecules, spread over the corpus (0: all)")
    temperatures: tuple[float, ...] = option((300.0, 600.0, 900.0), "MD temperatures, K")
    frames: int = option(8, "frames per (molecule, temperature)")
    seed: int = option(0, "seed of sampling, split and training")
    equilibration: int = option(200, "MD steps before the first frame of a trajectory")
    interval: int = option(25, "MD steps between frames")
    test_fraction: float = option(0.1, "share of molecules held out whole for testing")
    minutes: float = option(25.0, "training wall-clock budget, min")
    epochs: int = option(1000, "maximum training epochs")
    features: int = option(96, "PaiNN feature width")
    layers: int = option(3, "PaiNN interaction layers")
    cutoff: float = option(5.0, "neighbour-list radius, Å")
    batch_size: int = option(16, "structures per optimiser step")
    lr: float = option(5e-3, "peak learning rate (cosine schedule)")
    workers: int = option(2, "xTB worker processes (0: in this process)")
    threads: int = option(0, "torch threads (0: torch's default; 1 on a busy machine)")
    quiet: bool = option(False, "no progress bar")

    def corpus(self) -> CorpusOptions:
        return CorpusOptions(
            molecules=self.molecules,
            limit=self.limit,
            temperatures=self.temperatures,
            frames=self.frames,
            seed=self.seed,
            equilibration=self.equilibration,
            interval=self.interval,
        )

    def check(self) -> None:
        self.corpus().check()
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.minutes < 0 or self.epochs < 1:
            raise ConfigError("--minutes must be >= 0 and --epochs >= 1")


def _elements(smiles: str) -> frozenset[int]:
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    return frozenset(a.GetAtomicNum() for a in Chem.AddHs(mol).GetAtoms())


def split_molecules(smiles: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Held-out molecules: ``round(fraction * n)`` (at least 1) drawn with ``seed``, skipping any
    whose elements the remaining molecules would not cover (a model cannot predict an element
    it never saw). Returns them in corpus order."""
    if len(smiles) < 2:
        raise ConfigError(f"need at least 2 molecules to hold one out, got {len(smiles)}")
    wanted = min(max(1, round(fraction * len(smiles))), len(smiles) - 1)
    elements = {s: _elements(s) for s in smiles}
    test: set[str] = set()
    for k in np.random.default_rng(seed).permutation(len(smiles)):
        s = smiles[int(k)]
        rest = frozenset().union(*(elements[o] for o in smiles if o != s and o not in test))
        if elements[s] <= rest:
            test.add(s)
        if len(test) == wanted:
            break
    return [s for s in smiles if s in test]


def _data_step(opts: PretrainOptions, corpus: Path, folder: Path) -> dict[str, Any]:
    """Write ``manifest.json`` and ``split.json`` (by molecule) for ``corpus``."""
    from trustpot.data.reader import file_sha256, read_structures
    from trustpot.data.splits import write_manifest
    from trustpot.engines.labelling import stable_seed
    from trustpot.engines.xtb import tblite_version
    from trustpot.version import __version__

    smiles = corpus_smiles(opts.corpus())
    test = set(split_molecules(smiles, opts.test_fraction, opts.seed))
    frames = read_structures(corpus, require=(), use_cache=False)
    subsets: dict[str, list[int]] = {"train": [], "test": []}
    for i, s in enumerate(frames):
        subsets["test" if s.info["smiles"] in test else "train"].append(i)
    split = folder / "split.json"
    params = {"by": "smiles", "test_fraction": opts.test_fraction, "test": sorted(test)}
    write_manifest(corpus, subsets, "molecule", opts.seed, params, split)
    manifest = {
        "name": NAME,
        "trustpot_version": __version__,
        "reference": f"GFN2-xTB ({tblite_version()})",
        "data_file": corpus.name,
        "data_sha256": file_sha256(corpus),
        "n_frames": len(frames),
        "smiles": smiles,
        "temperatures": list(opts.temperatures),
        "frames_per_molecule_temperature": opts.frames,
        "run_seed": opts.seed,
        "trajectory_seeds": {
            f"{s}@{t:g}K": stable_seed(opts.seed, s, float(t), 0)
            for s in smiles
            for t in opts.temperatures
        },
        "corpus_options": dataclasses.asdict(opts.corpus()),
        "options": _shaping(opts),
        "split": {"train_molecules": len(smiles) - len(test), "test_molecules": sorted(test),
                  "train_frames": len(subsets["train"]), "test_frames": len(subsets["test"])},
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"split": str(split), "sha256": manifest["data_sha256"], "frames": len(frames)}


def _shaping(opts: PretrainOptions) -> dict[str, Any]:
    """The options that shape the result (not workers, threads, progress, folder)."""
    skip = ("out", "workers", "threads", "quiet")
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in skip}


def _run_config(opts: PretrainOptions, split: Path) -> Any:
    from trustpot.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    hypers = {"n_features": opts.features, "n_layers": opts.layers, "cutoff": opts.cutoff}
    return RunConfig(
        data=DataConfig(train=f"{split}:train", valid_fraction=0.05),
        model=ModelConfig(name="painn", hypers=hypers),
        train=TrainConfig(
            epochs=opts.epochs,
            max_minutes=opts.minutes,
            batch_size=opts.batch_size,
            lr=opts.lr,
            seed=opts.seed,
            threads=opts.threads,
            warmup_epochs=2,
        ),
    )


def _errors(
    rows: Sequence[tuple[int, int, float, np.ndarray]], numbers: np.ndarray
) -> dict[str, Any]:
    """``rows``: (frame n_atoms, _, energy error eV, [n_atoms, 3] force errors eV/Å)."""
    e = np.array([err / n for n, _, err, _ in rows])
    f = np.concatenate([fe for *_, fe in rows]) if rows else np.zeros((0, 3))
    return {
        "frames": len(rows),
        "energy_mae": float(1000 * np.mean(np.abs(e))),
        "forces_mae": float(1000 * np.mean(np.abs(f))),
        "forces_rmse": float(1000 * np.sqrt(np.mean(f**2))),
    }


def evaluate_held_out(checkpoint: Path, test_spec: str) -> dict[str, Any]:
    """Errors of ``checkpoint`` on ``test_spec`` frames: overall, per element (force
    components of that element's atoms), per temperature and per molecule.

    Energies are compared per frame after dividing by the atom count (meV/atom); forces by
    component (meV/Å).
    """
    from ase.data import chemical_symbols

    from trustpot import keys as K
    from trustpot.calculator import Predictor
    from trustpot.data.splits import read_data

    structures = read_data(test_spec)
    preds = Predictor.from_checkpoint(checkpoint).predict_structures(
        structures, (K.ENERGY, K.FORCES), source=test_spec
    )
    rows = []
    for s, p in zip(structures, preds):
        assert s.energy is not None and s.forces is not None
        rows.append((s.n_atoms, 0, float(p[K.ENERGY]) - s.energy, p[K.FORCES] - s.forces))
    numbers = np.concatenate([s.numbers for s in structures])
    forces = np.concatenate([r[3] for r in rows])
    per_element = {}
    for z in sorted(set(numbers.tolist())):
        fz = forces[numbers == z]
        per_element[chemical_symbols[z]] = {
            "atoms": int(fz.shape[0]),
            "forces_mae": float(1000 * np.mean(np.abs(fz))),
            "forces_rmse": float(1000 * np.sqrt(np.mean(fz**2))),
        }

    def grouped(key: str, fmt: Callable[[Any], str]) -> dict[str, Any]:
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(structures):
            groups.setdefault(fmt(s.info[key]), []).append(i)
        return {g: _errors([rows[i] for i in idx], numbers) for g, idx in groups.items()}

    return {
        "units": {"energy": "meV/atom", "forces": "meV/Å (components)"},
        "overall": _errors(rows, numbers),
        "per_element": per_element,
        "per_temperature": grouped("temperature", lambda t: f"{float(t):g} K"),
        "per_molecule": grouped("smiles", str),
    }


def write_card(out: Path, card: dict[str, Any]) -> None:
    """``card.json`` and a readable ``card.md`` of the same figures."""
    (out / "card.json").write_text(json.dumps(card, indent=1))
    ev, data, tr = card["held_out"], card["data"], card["training"]
    o = ev["overall"]
    lines = [
        f"# {NAME}",
        "",
        f"PaiNN potential ({tr['parameters']} parameters, {tr['hypers']}) trained on "
        f"{data['reference']} energies and forces of {data['train_molecules']} small organic "
        f"molecules (elements {', '.join(data['elements'])}) sampled by Langevin MD at "
        f"{', '.join(f'{t:g}' for t in data['temperatures'])} K, "
        f"{data['frames_per_molecule_temperature']} frames per molecule and temperature "
        f"({data['train_frames']} training frames; data SHA-256 {data['sha256'][:16]}...).",
        "",
        f"Training: budget {tr['budget_minutes']:g} min, {tr['epochs']} epochs "
        f"(best {tr['best_epoch']}, stopped by {tr['stopped_by']}), {tr['elapsed_s'] / 60:.1f} "
        "min.",
        "",
        f"## Held-out molecules ({len(data['test_molecules'])}, {o['frames']} frames, never "
        "trained on)",
        "",
        f"Energy MAE {o['energy_mae']:.1f} meV/atom; force MAE {o['forces_mae']:.0f} meV/Å "
        f"(RMSE {o['forces_rmse']:.0f}).",
        "",
        "| element | atoms | force MAE (meV/Å) | force RMSE (meV/Å) |",
        "|---|---|---|---|",
    ]
    for el, e in ev["per_element"].items():
        lines.append(f"| {el} | {e['atoms']} | {e['forces_mae']:.0f} | {e['forces_rmse']:.0f} |")
    lines += ["", "| temperature | frames | energy MAE (meV/atom) | force MAE (meV/Å) |"]
    lines.append("|---|---|---|---|")
    for t, e in ev["per_temperature"].items():
        lines.append(f"| {t} | {e['frames']} | {e['energy_mae']:.1f} | {e['forces_mae']:.0f} |")
    lines += ["", "| held-out molecule | energy MAE (meV/atom) | force MAE (meV/Å) |"]
    lines.append("|---|---|---|")
    for s, e in sorted(ev["per_molecule"].items(), key=lambda kv: kv[1]["forces_mae"]):
        lines.append(f"| `{s}` | {e['energy_mae']:.1f} | {e['forces_mae']:.0f} |")
    lines += ["", f"Reproduce: `{card['command']}`", ""]
    (out / "card.md").write_text("\n".join(lines))


def run_pretrain(opts: PretrainOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every step; returns the card (also in ``OUT/card.json``)."""
    from trustpot.engines.xtb import require_xtb, tblite_version
    from trustpot.train.run import run_training

    opts.check()
    require_xtb()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus_opts = opts.corpus()
    t0 = time.perf_counter()

    def corpus_step(folder: Path, resuming: bool) -> dict[str, Any]:
        summary = generate_corpus(
            folder / "corpus.xyz", corpus_opts, opts.workers, progress=not opts.quiet
        )
        if summary.failed:
            raise ConfigError(
                f"{summary.failed} corpus frame(s) failed ({summary.failed_path}); rerun"
            )
        return {
            "frames": summary.total,
            "seconds": summary.seconds,
            "written": summary.written,
            "resumed": summary.resumed,
        }

    corpus_cfg = {"corpus": dataclasses.asdict(corpus_opts), "method": "GFN2-xTB"}
    c = run_step(out / "corpus", corpus_cfg, corpus_step, log)
    corpus = out / "corpus" / "corpus.xyz"
    d = run_step(
        out / "data",
        {**corpus_cfg, "test_fraction": opts.test_fraction, "seed": opts.seed},
        lambda folder, _: _data_step(opts, corpus, folder),
        log,
    )
    cfg = _run_config(opts, Path(d["split"]))

    def train_step(folder: Path, resuming: bool) -> dict[str, Any]:
        run_dir = folder / "run"
        result = run_training(cfg, run_dir, resume=(run_dir / "last.ckpt").is_file())
        return dataclasses.asdict(result)

    from trustpot.config import config_to_dict

    t = run_step(out / "train", {"run": config_to_dict(cfg), "data_sha256": d["sha256"]},
                 train_step, log)  # fmt: skip
    best = out / "train" / "run" / "best.ckpt"
    e = run_step(
        out / "eval",
        {"checkpoint_of": str(out / "train"), "data_sha256": d["sha256"]},
        lambda folder, _: evaluate_held_out(best, f"{d['split']}:test"),
        log,
    )
    e.pop("reused", None)
    from trustpot.io.checkpoint import load_potential

    model = load_potential(best)
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    from ase.data import chemical_symbols

    argv = f"trustpot pretrain --out {out.name} --minutes {opts.minutes:g}"
    defaults = PretrainOptions(out=opts.out)
    for f in dataclasses.fields(PretrainOptions):
        value = getattr(opts, f.name)
        if f.name not in ("out", "minutes", "workers", "quiet") and value != getattr(
            defaults, f.name
        ):
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
            argv += f" --{f.name.replace('_', '-')} {shown}"
    card = {
        "name": NAME,
        "command": argv,
        "trustpot_version": manifest["trustpot_version"],
        "data": {
            "reference": f"GFN2-xTB ({tblite_version()})",
            "sha256": d["sha256"],
            "frames": d["frames"],
            "molecules": len(manifest["smiles"]),
            "train_molecules": manifest["split"]["train_molecules"],
            "test_molecules": manifest["split"]["test_molecules"],
            "train_frames": manifest["split"]["train_frames"],
            "test_frames": manifest["split"]["test_frames"],
            "temperatures": list(opts.temperatures),
            "frames_per_molecule_temperature": opts.frames,
            "elements": [chemical_symbols[z] for z in model.species],
            # xTB wall time of the frames the corpus step wrote (resumed frames cost nothing)
            "corpus_step_seconds": c.get("seconds"),
            "corpus_frames_written": c.get("written"),
        },
        "training": {
            "backbone": "painn",
            "hypers": {"n_features": opts.features, "n_layers": opts.layers,
                       "cutoff": opts.cutoff},
            "parameters": sum(p.numel() for p in model.parameters()),
            "budget_minutes": opts.minutes,
            "epochs": t["epochs"],
            "best_epoch": t["best_epoch"],
            "stopped_by": t["stopped_by"],
            "elapsed_s": t["elapsed_s"],
            "validation": t["best_metrics"],
        },
        "held_out": e,
        "options": _shaping(opts),
        "wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    write_card(out, card)
    shutil.copyfile(best, out / f"{NAME}.ckpt")
    log(f"{out / (NAME + '.ckpt')}: written; card {out / 'card.md'}")
    return card
