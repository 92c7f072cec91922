"""Training flags shared by ``trustpot train`` and ``trustpot uq fit``."""

from __future__ import annotations

import argparse

from trustpot.config import RunConfig, load_config

#: flag -> (config section, key)
TRAIN_FLAGS: dict[str, tuple[str, str]] = {
    "train": ("data", "train"),
    "valid": ("data", "valid"),
    "valid_fraction": ("data", "valid_fraction"),
    "isolated_atoms": ("data", "isolated_atoms"),
    "model": ("model", "name"),
    "dtype": ("model", "dtype"),
    "max_minutes": ("train", "max_minutes"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
}


def add_training_flags(p: argparse.ArgumentParser, with_config: bool = True) -> None:
    """Data, model and training flags plus ``-o KEY=VALUE`` overrides."""
    if with_config:
        p.add_argument("config", nargs="?", help="YAML config (sections data, model, train)")
    p.add_argument(
        "--train",
        help="training data file (any ASE format) or split.json:SUBSET; several joined by "
        "commas: a.xyz,b.xyz.gz,split.json:train",
    )
    p.add_argument("--valid", help="validation data file or split.json:SUBSET (commas: several)")
    p.add_argument("--valid-fraction", type=float, help="share of --train held out (default 0.05)")
    p.add_argument("--isolated-atoms", help="file of isolated-atom energies (else least squares)")
    p.add_argument(
        "--model", help="backbone: schnet, painn, egnn, ace or deepset-moe (default painn)"
    )
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--max-minutes", type=float, help="wall-clock budget in minutes")
    p.add_argument("--epochs", type=int, help="maximum epochs")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any option, e.g. -o train.lr=1e-3 -o model.hypers.n_features=128",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config that the flags (and the optional YAML file) describe."""
    base: dict[str, dict[str, object]] = {"data": {}, "model": {}, "train": {}}
    for flag, (section, key) in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            base[section][key] = value
    return load_config(getattr(args, "config", None), args.override, base)
