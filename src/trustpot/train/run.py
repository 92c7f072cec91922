"""Run driver: read data, build or restore a model, train, write the run directory.

A run directory holds ``config.resolved.yaml``, ``split.json`` (validation indices),
``log.txt``, ``metrics.csv``, ``best.ckpt`` (inference weights of the best epoch) and
``last.ckpt`` (everything needed to resume).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trustpot.config import ModelConfig, RunConfig, config_to_dict, dump_config
from trustpot.data.dataset import GraphDataset
from trustpot.data.reader import KeyMap, read_structures
from trustpot.data.splits import data_sha256, read_data
from trustpot.data.stats import isolated_atom_energies
from trustpot.data.structures import Structure, check_species
from trustpot.errors import ConfigError
from trustpot.io.checkpoint import read_checkpoint
from trustpot.models.build import build_potential
from trustpot.models.potential import Potential
from trustpot.train.distributed import init_distributed
from trustpot.train.losses import LossWeights
from trustpot.train.trainer import Objective, Trainer, TrainResult


def key_map(cfg: RunConfig) -> KeyMap:
    d = cfg.data
    return KeyMap(d.energy_key, d.forces_key, d.stress_key, d.energy_unit, d.length_unit)


def split_train_valid(
    structures: list[Structure], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Random train/validation indices (at least one of each)."""
    n = len(structures)
    if n < 2:
        raise ConfigError(f"need at least 2 structures to hold out validation data, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(fraction * n)), n - 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def train_and_valid(
    structures: list[Structure], valid: list[Structure] | None, fraction: float, seed: int
) -> tuple[list[int], list[int], list[Structure]]:
    """Training indices into ``structures``, held-out validation indices (empty when a
    separate ``valid`` set is given) and the validation structures."""
    if valid is not None:
        return list(range(len(structures))), [], valid
    train_idx, val_idx = split_train_valid(structures, fraction, seed)
    return train_idx, val_idx, [structures[i] for i in val_idx]


def open_run_dir(out: Path, resume: bool, is_main: bool) -> Callable[[str], None]:
    """Check ``out`` against ``resume`` (a run there must be resumed; a resume needs one),
    create it, and return the run's logger: time-stamped lines on stdout and in ``out/log.txt``
    (main process only)."""
    last = out / "last.ckpt"
    if resume and not last.is_file():
        raise ConfigError(f"{out}: nothing to resume (no last.ckpt)")
    if not resume and last.is_file():
        raise ConfigError(
            f"{out}: holds a run already; pass --resume to continue it or pick a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        if is_main:
            line = f"[{time.strftime('%H:%M:%S')}] {message}"
            print(line, flush=True)
            with open(out / "log.txt", "a") as handle:
                handle.write(line + "\n")

    return log


def warm_start(cfg: RunConfig) -> Potential:
    """The potential of ``cfg.model.init_from``, checked against the model options of ``cfg``.

    Raises:
        ConfigError: naming ``model.init_from`` when the checkpoint is another backbone, dtype
            or head dropout, disagrees with a hyper-parameter set in ``cfg``, or when
            ``data.isolated_atoms`` is set (the checkpoint's reference energies are kept).
    """
    from trustpot.io.checkpoint import load_potential

    path = cfg.model.init_from
    if cfg.data.isolated_atoms:
        raise ConfigError(
            "data.isolated_atoms would be ignored with model.init_from (the warm start keeps "
            f"the reference energies of {path})"
        )
    model = load_potential(path)
    meta = model.meta
    wanted = {"name": cfg.model.name, "dtype": cfg.model.dtype,
              "head_dropout": cfg.model.head_dropout}  # fmt: skip
    have = {"name": meta.backbone, "dtype": meta.dtype, "head_dropout": meta.head_dropout}
    wanted.update({f"hypers.{k}": v for k, v in cfg.model.hypers.items()})
    have.update({f"hypers.{k}": meta.hypers.get(k) for k in cfg.model.hypers})
    differ = [f"model.{k} ({have[k]!r} in the checkpoint, {v!r} here)"
              for k, v in wanted.items() if have[k] != v]  # fmt: skip
    if differ:
        raise ConfigError(f"model.init_from {path}: {'; '.join(differ)}")
    return model


def run_training(cfg: RunConfig, out: str | Path, resume: bool = False) -> TrainResult:
    """Train a potential as ``cfg`` says and write the run directory ``out``."""
    out = Path(out)
    info = init_distributed()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    last = out / "last.ckpt"
    log = open_run_dir(out, resume, info.is_main)
    if not cfg.data.train:
        raise ConfigError("no training data: set --train (data.train)")
    keys = key_map(cfg)
    all_train = read_data(cfg.data.train, keys)
    given = read_data(cfg.data.valid, keys) if cfg.data.valid else None
    train_idx, val_idx, valid = train_and_valid(
        all_train, given, cfg.data.valid_fraction, cfg.train.seed
    )
    if cfg.data.max_train and cfg.data.max_train < len(train_idx):
        rng = np.random.default_rng(cfg.train.seed + 1)
        train_idx = sorted(rng.choice(train_idx, cfg.data.max_train, replace=False).tolist())
    train = [all_train[i] for i in train_idx]

    if resume:
        data = read_checkpoint(last)
        saved = data.get("training", {}).get("config", {})
        # options added since the checkpoint was written take their defaults
        saved_model = {**config_to_dict(ModelConfig()), **saved.get("model", {})}
        if saved.get("model") and saved_model != config_to_dict(cfg)["model"]:
            raise ConfigError(
                f"{last}: the model options differ from the run being resumed; "
                f"saved {saved['model']}, now {config_to_dict(cfg)['model']}"
            )
        model = Potential.from_payload(data, str(last))
    elif cfg.model.init_from:
        model = warm_start(cfg)
    else:
        e0 = None
        if cfg.data.isolated_atoms:
            e0 = isolated_atom_energies(
                read_structures(cfg.data.isolated_atoms, keys, require=("energy",)),
                cfg.data.isolated_atoms,
            )
        model = build_potential(
            cfg.model.name,
            dict(cfg.model.hypers),
            train,
            cfg.model.dtype,
            seed=cfg.train.seed,
            reference_energies=e0,
            head_dropout=cfg.model.head_dropout,
        )
    check_species(train, model.species, cfg.data.train)
    check_species(valid, model.species, cfg.data.valid or cfg.data.train)

    if info.is_main:
        dump_config(cfg, out / "config.resolved.yaml")
        (out / "split.json").write_text(
            json.dumps(
                {
                    "train_file": str(cfg.data.train),
                    "train_sha256": data_sha256(cfg.data.train),
                    "seed": cfg.train.seed,
                    "train_indices": train_idx,
                    "valid_indices": val_idx,
                    "valid_file": cfg.data.valid or None,
                }
            )
        )
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{'resuming' if resume else 'training'} {model.meta.backbone} ({n_params} parameters, "
        f"{model.meta.dtype}) on {len(train)} structures, validating on {len(valid)}; "
        f"processes: {info.world_size}"
    )
    dtype = model.dtype
    specs = model.neighbor_lists()
    train_ds = GraphDataset(train, specs, dtype, cfg.data.train)
    valid_ds = GraphDataset(valid, specs, dtype, cfg.data.valid or cfg.data.train)
    t = cfg.train
    weights = LossWeights(t.energy_weight, t.forces_weight, t.stress_weight, t.loss, t.huber_delta)
    try:
        model = model.to(torch.device(t.device))
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"train.device '{t.device}' is not usable here: {err}") from None
    stage_two = None
    if t.stage_two_fraction > 0:
        stage_two = (t.stage_two_fraction, t.stage_two_energy_weight, t.stage_two_forces_weight)
    trainer = Trainer(
        model,
        [Objective("main", "main", weights, stage_two=stage_two)],
        t,
        info,
        run_config=config_to_dict(cfg),
    )
    if resume:
        trainer.load_training_state(last)
        log(f"resumed at epoch {trainer.epoch} ({trainer.elapsed / 60:.1f} min used)")
    return trainer.fit({"main": train_ds}, {"main": valid_ds}, out, log=log)
