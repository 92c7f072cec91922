"""MACE (mace-torch) trained under a wall-clock budget: the peer of trustpot's accuracy benchmark.

Runs only with the Python of ``benchmarks/.mace-venv`` (mace-torch, e3nn, torch, numpy, ase;
trustpot is not imported)::

    benchmarks/.mace-venv/bin/python benchmarks/mace_peer.py JOB.json

``JOB.json`` holds ``size`` ("small": hidden irreps 32x0e+32x1o, "medium": 128x0e+128x1o),
``cutoff`` (Å), ``train`` / ``valid`` (lists of ``[path, indices or null]``: each file is read
with ``ase.io.read(path, ":")``, then the indices are taken, or every frame when null; entries
are concatenated), ``tests`` (name -> such a list), ``minutes`` (training budget), ``max_epochs``,
``seed``, ``threads``, ``batch_size``, ``lr`` and ``out`` (folder). Relative paths are taken from
the working directory. An invalid job exits with code 2 and a message naming the field; it is
checked with the standard library only, before torch is imported.

Labels: ``atoms.info["energy"]`` else ``atoms.get_potential_energy()`` (eV), and
``atoms.arrays["forces"]`` else ``atoms.get_forces()`` (eV/Å); ASE moves the extxyz labels of
rMD17, 3BPA and the zeolites to a SinglePointCalculator, so the fallbacks are the usual path.
Cell and pbc come from the frames (periodic zeolites use their cell).

Model: ``mace_run_train --model MACE`` defaults, built here with mace's own functions: a
ScaleShiftMACE with RealAgnosticInteractionBlock then RealAgnosticResidualInteractionBlock,
max_ell 3, correlation 3, 2 interactions, 8 Bessel functions, polynomial cutoff 5, MLP 16x0e,
radial MLP [64, 64, 64], SiLU gate; E0s by ``compute_average_E0s`` (least squares on the training
frames), ``avg_num_neighbors`` by ``compute_avg_num_neighbors`` and the scale by
``rms_forces_scaling`` on the training loader, shift 0 (as ``--model MACE``). float32 (the CLI's
default would be float64).

Training: mace's recipe, with mace's pieces: ``WeightedEnergyForcesLoss`` (energy weight 1 on the
per-atom energy, forces weight 100); Adam with amsgrad, betas (0.9, 0.999) and weight decay 5e-7
on the interaction linear / skip weights and the products, from mace's ``get_params_options`` and
``get_optimizer``; each step is ``mace.tools.train.take_step`` (gradient-norm clipping 10, then an
EMA update, decay 0.99, torch_ema); the training loader shuffles and drops the last partial
batch. After each epoch the EMA weights are scored on the validation frames with
``mace.tools.train.evaluate``, ReduceLROnPlateau (factor 0.8, patience 50) steps on its loss, and
the EMA weights with the lowest validation force RMSE are kept (mace keeps the lowest loss).
Training stops after the epoch that reaches ``max_epochs`` or crosses ``minutes`` of training time
(training plus validation; data loading, model building and file writing are not counted).

Outputs under ``out``: ``mace_peer.json`` (rewritten after every epoch, so a killed run leaves
its learning curve; ``curve`` rows are epoch = epochs done, minutes, validation energy MAE per
atom in eV, force MAE and RMSE in eV/Å) and, at the end, ``<test>/predictions.npz`` per test set
from the best weights, laid out as trustpot's eval writes it: ``energy`` [n_frames] eV,
``forces`` [sum of atoms, 3] eV/Å (frames in order), ``n_atoms`` [n_frames].
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from ase import Atoms

SIZES = {"small": "32x0e+32x1o", "medium": "128x0e+128x1o"}
KEYS = ("size", "cutoff", "train", "valid", "tests", "minutes", "max_epochs", "seed", "threads")
KEYS += ("batch_size", "lr", "out")
Source = tuple[Path, list[int] | None]
OUTPUT_ARGS = {"energy": True, "forces": True, "virials": False, "stress": False}


class JobError(ValueError):
    """An invalid job: the message names the field."""


def _number(job: dict[str, Any], key: str, kind: type, low: float) -> Any:
    """``job[key]`` checked to be a ``kind`` (int or float, bools refused) >= ``low``."""
    value = job[key]
    ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool) or value < low:
        what = "an integer" if kind is int else "a number"
        raise JobError(f"'{key}' must be {what} >= {low}, got {value!r}")
    return kind(value)


def _sources(field: str, value: Any) -> list[Source]:
    """``[[path, indices or null], ...]`` of ``field`` checked: files exist, indices are ints."""
    if not isinstance(value, list) or not value:
        raise JobError(f"'{field}' must be a non-empty list of [path, indices or null]")
    out: list[Source] = []
    for k, item in enumerate(value):
        where = f"'{field}' entry {k}"
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise JobError(f"{where} must be [path, indices or null], got {item!r}")
        path, idx = Path(item[0]), item[1]
        if not path.is_file():
            raise JobError(f"{where}: file {path} not found")
        if idx is not None and not (
            isinstance(idx, list) and all(type(i) is int and i >= 0 for i in idx) and idx
        ):
            raise JobError(f"{where}: indices must be null or a non-empty list of ints >= 0")
        out.append((path, idx))
    return out


def load_job(path: Path) -> dict[str, Any]:
    """The job file parsed and checked (standard library only); raises :class:`JobError`."""
    try:
        job = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise JobError(f"cannot read job file {path}: {err}") from err
    if not isinstance(job, dict):
        raise JobError("the job must be a JSON object")
    missing = [k for k in KEYS if k not in job]
    if missing:
        raise JobError(f"missing field(s): {', '.join(missing)}")
    if job["size"] not in SIZES:
        raise JobError(f"'size' must be one of {', '.join(SIZES)}, got {job['size']!r}")
    checked = {"size": job["size"], "out": Path(str(job["out"]))}
    for key, kind, low in [("cutoff", float, 0.5), ("minutes", float, 0.0), ("lr", float, 0.0)]:
        checked[key] = _number(job, key, kind, low)
    for key, low in [("max_epochs", 1), ("seed", 0), ("threads", 1), ("batch_size", 1)]:
        checked[key] = _number(job, key, int, low)
    checked["train"] = _sources("train", job["train"])
    checked["valid"] = _sources("valid", job["valid"])
    tests = job["tests"]
    if not isinstance(tests, dict):
        raise JobError("'tests' must be an object {name: [[path, indices or null], ...]}")
    for name in tests:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise JobError(f"'tests' name {name!r} must be a plain folder name")
    checked["tests"] = {name: _sources(f"tests.{name}", v) for name, v in tests.items()}
    return checked


def read_frames(field: str, sources: list[Source], cache: dict[Path, list[Atoms]]) -> list[Atoms]:
    """Frames of ``sources`` with ``REF_energy`` (eV) / ``REF_forces`` (eV/Å) set for mace."""
    import ase.io

    frames = []
    for path, idx in sources:
        if path not in cache:
            try:
                cache[path] = list(ase.io.read(path, ":"))
            except Exception as err:  # ase raises many kinds on a malformed file
                raise JobError(f"'{field}': cannot read {path} with ase: {err}") from err
        every = cache[path]
        if idx is not None and max(idx) >= len(every):
            raise JobError(f"'{field}': index {max(idx)} out of range for {path} ({len(every)})")
        for i in range(len(every)) if idx is None else idx:
            atoms = every[i]
            try:
                energy = atoms.info.get("energy")
                energy = atoms.get_potential_energy() if energy is None else energy
                forces = atoms.arrays.get("forces")
                forces = atoms.get_forces() if forces is None else forces
            except RuntimeError as err:
                raise JobError(f"'{field}': frame {i} of {path} has no energy/forces") from err
            labelled = atoms.copy()
            labelled.info["REF_energy"] = float(energy)
            labelled.arrays["REF_forces"] = forces.astype(float)
            frames.append(labelled)
    return frames


def loader(frames: list[Atoms], z_table: Any, job: dict[str, Any], train: bool) -> Any:
    """A mace DataLoader of ``frames``; the training one shuffles and drops a partial batch."""
    import torch
    from mace import data
    from mace.tools import torch_geometric

    keyspec = data.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    configs = [data.config_from_atoms(a, key_specification=keyspec) for a in frames]
    graphs = [
        data.AtomicData.from_config(c, z_table=z_table, cutoff=job["cutoff"]) for c in configs
    ]
    return torch_geometric.dataloader.DataLoader(
        graphs, batch_size=job["batch_size"], shuffle=train, drop_last=train,
        generator=torch.Generator().manual_seed(job["seed"]),
    )  # fmt: skip


def build_model(job: dict[str, Any], frames: list[Atoms], train_loader: Any, z_table: Any) -> Any:
    """ScaleShiftMACE of ``mace_run_train --model MACE`` defaults at ``job['size']``."""
    import numpy as np
    import torch
    from e3nn import o3
    from mace import data, modules

    keyspec = data.KeySpecification(info_keys={"energy": "REF_energy"})
    configs = [data.config_from_atoms(a, key_specification=keyspec) for a in frames]
    e0s = data.compute_average_E0s(configs, z_table)
    atomic_energies = np.array([e0s[z] for z in z_table.zs])
    _, rms = modules.scaling_classes["rms_forces_scaling"](train_loader, atomic_energies)
    model = modules.ScaleShiftMACE(
        r_max=job["cutoff"], num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=2, num_elements=len(z_table.zs),
        hidden_irreps=o3.Irreps(SIZES[job["size"]]), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=atomic_energies,
        avg_num_neighbors=modules.compute_avg_num_neighbors(train_loader),
        atomic_numbers=z_table.zs, correlation=3, gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64], radial_type="bessel",
        atomic_inter_scale=rms, atomic_inter_shift=[0.0],
    )  # fmt: skip
    return model.float()


def predict(model: torch.nn.Module, data_loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Energies [n_frames] (eV) and forces [sum of atoms, 3] (eV/Å), float64, in order."""
    import numpy as np

    energies, forces = [], []
    for batch in data_loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        energies.append(out["energy"].detach().double().numpy())
        forces.append(out["forces"].detach().double().numpy())
    return np.concatenate(energies), np.concatenate(forces)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def run(job: dict[str, Any], start: float) -> dict[str, Any]:
    """Train, keep the best validation weights, predict the tests; returns the report."""
    import mace
    import numpy as np
    import torch
    from mace import modules
    from mace.tools import AtomicNumberTable, set_seeds
    from mace.tools.scripts_utils import get_optimizer, get_params_options
    from mace.tools.train import evaluate, take_step
    from torch_ema import ExponentialMovingAverage

    warnings.filterwarnings("ignore", message="The TorchScript type system")  # e3nn, per layer
    torch.set_num_threads(job["threads"])
    torch.set_default_dtype(torch.float32)
    set_seeds(job["seed"])
    cache: dict[Path, list[Atoms]] = {}
    train = read_frames("train", job["train"], cache)
    valid = read_frames("valid", job["valid"], cache)
    tests = {name: read_frames(f"tests.{name}", s, cache) for name, s in job["tests"].items()}
    if len(train) < job["batch_size"]:
        raise JobError(f"'train' has {len(train)} frames, fewer than 'batch_size'")
    zs = sorted({int(z) for a in train for z in a.numbers})
    for field, frames in [("valid", valid), *((f"tests.{n}", f) for n, f in tests.items())]:
        extra = {int(z) for a in frames for z in a.numbers} - set(zs)
        if extra:
            raise JobError(f"'{field}' has elements {sorted(extra)} absent from 'train'")
    z_table = AtomicNumberTable(zs)
    train_loader = loader(train, z_table, job, train=True)
    valid_loader = loader(valid, z_table, job, train=False)
    model = build_model(job, train, train_loader, z_table)

    loss_fn = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
    hypers = argparse.Namespace(
        lr=job["lr"], weight_decay=5e-7, amsgrad=True, beta=0.9, freeze=None,
        lr_params_factors="{}", optimizer="adam",
    )  # fmt: skip
    optimizer = get_optimizer(hypers, get_params_options(hypers, model))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.8, patience=50)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.99)
    device = torch.device("cpu")
    out: Path = job["out"]
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "code": "mace", "mace_version": mace.__version__, "torch_version": torch.__version__,
        "size": job["size"], "hidden_irreps": SIZES[job["size"]],
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "epochs": 0, "best_epoch": 0, "train_minutes": 0.0, "wall_s": 0.0, "stopped_by": None,
        "curve": [], "n_train": len(train), "n_valid": len(valid),
        "threads": job["threads"], "seed": job["seed"],
    }  # fmt: skip
    elapsed, best_rmse, best_state = 0.0, float("inf"), None
    while report["stopped_by"] is None:
        t0 = time.perf_counter()
        for batch in train_loader:
            take_step(
                model=model, loss_fn=loss_fn, batch=batch, optimizer=optimizer, ema=ema,
                output_args=OUTPUT_ARGS, max_grad_norm=10.0, device=device,
            )  # fmt: skip
        with ema.average_parameters():
            valid_loss, metrics = evaluate(model, loss_fn, valid_loader, OUTPUT_ARGS, device)
            epoch = report["epochs"] = report["epochs"] + 1
            if metrics["rmse_f"] < best_rmse:
                best_rmse, report["best_epoch"] = metrics["rmse_f"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        scheduler.step(float(valid_loss))
        elapsed += time.perf_counter() - t0
        row = {
            "epoch": epoch, "minutes": round(elapsed / 60, 4),
            "valid_energy_mae_per_atom": float(metrics["mae_e_per_atom"]),
            "valid_forces_mae": float(metrics["mae_f"]),
            "valid_forces_rmse": float(metrics["rmse_f"]),
        }  # fmt: skip
        report["curve"].append(row)
        if epoch >= job["max_epochs"]:
            report["stopped_by"] = "max_epochs"
        elif elapsed >= 60 * job["minutes"]:
            report["stopped_by"] = "minutes"
        report["train_minutes"] = round(elapsed / 60, 4)
        report["wall_s"] = round(time.perf_counter() - start, 2)
        write_json(out / "mace_peer.json", report)
        mae = 1000 * row["valid_forces_mae"]
        print(f"epoch {epoch} {row['minutes']:.2f} min valid F MAE {mae:.1f} meV/Å", flush=True)

    assert best_state is not None
    model.load_state_dict(best_state)
    report["tests"] = {}
    for name, frames in tests.items():
        energy, forces = predict(model, loader(frames, z_table, job, train=False))
        (out / name).mkdir(exist_ok=True)
        n_atoms = np.array([len(a) for a in frames], dtype=np.int64)
        np.savez_compressed(out / name / "predictions.npz", energy=energy, forces=forces,
                            n_atoms=n_atoms)  # fmt: skip
        report["tests"][name] = f"{name}/predictions.npz"
    report["wall_s"] = round(time.perf_counter() - start, 2)
    write_json(out / "mace_peer.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: ``mace_peer.py JOB.json``; 0 on success, 2 on an invalid job."""
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path, help="job file (JSON), see the module docstring")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job)
        report = run(job, start)
    except JobError as err:
        print(f"mace_peer: invalid job {args.job}: {err}", file=sys.stderr)
        return 2
    print(f"mace_peer: {report['epochs']} epochs ({report['stopped_by']}), best epoch "
          f"{report['best_epoch']}, results in {job['out']}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
