"""``trustpot finetune``: adapt a trained or pretrained model to new data, one way.

Steps (:func:`run_finetune`):

1. read the downstream data (the readers of :mod:`trustpot.data`; ``--valid`` or a held-out
   ``--valid-fraction``);
2. wrap the starting model (a checkpoint of any kind, or a pretrained name) in a
   :class:`~trustpot.models.finetuned.FineTuned` model and fit its per-element energy offsets by
   least squares on the training energies, before the first step (a new level of theory with
   another energy zero then costs no gradient);
3. turn :meth:`~trustpot.models.contract.Model.layer_groups` into AdamW parameter groups as the
   strategy says (:func:`strategy_rates`): ``full`` (every group at ``lr``), ``freeze`` (the
   first ``freeze_layers`` groups fixed, by default all but the head) or ``llrd`` (layer-wise
   learning-rate decay, shape ``decay`` or JMP's ``u``);
4. train with the one :class:`~trustpot.train.trainer.Trainer` (EMA, cosine schedule, budget,
   ``best.ckpt``/``last.ckpt``, bit-identical resume after a kill with ``resume=True``,
   ``torchrun``) and write the run folder as ``trustpot train`` does, plus ``finetune.json``
   (offsets, force scale, every group's learning rate, the replay labels used);
5. write the report (:func:`write_report`, also at the end of a resumed run): ``report.json``,
   ``report.md`` and t-SNE maps ``tsne_element.png``, ``tsne_environment.png``
   (:mod:`trustpot.finetune_report`, :mod:`trustpot.finetune_render`): downstream error on the
   validation frames and on ``--test-ood`` frames, forgetting on the ``--replay`` frames (else
   the validation frames), drift per layer, and a one-line verdict, also the log's last line.

``--replay`` frames carry either the user's labels (``--replay-labels given``; ``auto`` when
every frame has forces) or pseudo-labels, the starting model's own predictions (``pseudo``;
computed once, cached in ``replay_pseudo.xyz``). The same choice feeds ``--strategy mft``'s
replay objective and the report's forgetting reference.

The loss is :class:`~trustpot.train.objectives.ForceFieldLoss` in units of the RMS of the
downstream training forces (eV/Å): the same dimensionless loss as a model trained from scratch
on that data, whatever scale the starting model was trained with.

With ``--target KEY`` it is a property read from the frames (:mod:`trustpot.finetune_target`);
the downstream energy and force labels then join (objective ``forcefield``, offsets fitted) only
when ``--energy-weight`` or ``--forces-weight`` is given; ``mft`` adds the replay objective.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from ase.io import write

from trustpot import keys as K
from trustpot.calculator import Predictor
from trustpot.config import TrainConfig
from trustpot.data.dataset import GraphDataset
from trustpot.data.graph import to_device
from trustpot.data.splits import read_data
from trustpot.data.stats import force_rms
from trustpot.data.structures import Structure, check_species
from trustpot.errors import ConfigError, DataError
from trustpot.finetune_render import report_markdown, tsne_maps
from trustpot.finetune_report import (
    compare_embeddings,
    downstream_errors,
    finetune_report,
    with_offsets,
)
from trustpot.finetune_target import (
    attach_head,
    downstream_data,
    property_objective,
    resolve_target,
)
from trustpot.io.checkpoint import load_model, read_checkpoint
from trustpot.models.contract import Model
from trustpot.models.finetuned import FineTuned, fit_energy_offsets
from trustpot.models.property_head import KINDS, LEVELS, REDUCTIONS
from trustpot.options import option
from trustpot.train.datasets import TrainerDataset, full_batch
from trustpot.train.distributed import barrier, init_distributed
from trustpot.train.ewc import EWCPenalty, fisher_diagonal
from trustpot.train.losses import LossWeights
from trustpot.train.objectives import ForceFieldLoss, Objective, ParamGroup, TrainResult
from trustpot.train.run import open_run_dir, train_and_valid
from trustpot.train.trainer import Trainer

__all__ = ["REPLAY_LABELS", "STRATEGIES", "FinetuneOptions", "run_finetune", "strategy_rates"]

STRATEGIES = ("full", "freeze", "llrd", "mft")
LLRD_SHAPES = ("decay", "u")
DEFAULT_LLRD_DECAY = 0.7
REPLAY_LABELS = ("auto", "given", "pseudo")


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """What ``trustpot finetune`` does; every field is one flag.

    Strategy options default to ``None`` (resolved by :attr:`decay` / :meth:`frozen_count`),
    so that a flag the chosen strategy cannot use is an error naming it.
    """

    base: str = option("", "checkpoint (any kind) or pretrained name (chgnet, sevennet-0) "
                       "to start from", flag="--from", required=True)  # fmt: skip
    train: str = option("", "training data (any ASE format) or split.json:SUBSET", required=True)
    valid: str = option("", "validation data (default: --valid-fraction of --train)")
    replay: str = option(
        "",
        "frames of the pretraining domain: the mft replay objective, the EWC Fisher and the "
        "report's forgetting and drift (default for the report: the validation frames)",
    )
    replay_labels: str | None = option(
        None, "labels of the --replay frames: given (the file's forces; an error naming the "
        "frame that lacks them), pseudo (the starting model's predictions, cached) or auto "
        "(given when every frame has forces, else pseudo; the default)", choices=REPLAY_LABELS,
    )  # fmt: skip
    test_ood: str = option(
        "", "out-of-domain frames with energies and forces (any ASE format or split.json:SUBSET) "
        "for the report's downstream error, beside the validation frames (in domain)",
    )  # fmt: skip
    valid_fraction: float | None = option(None, "share of --train held out (default 0.1)")
    strategy: str = option("full", "full, freeze (first groups fixed), llrd (layer-wise lr "
                           "decay) or mft (multi-task: full fine-tuning plus the pretraining "
                           "force field on --replay frames, labelled as --replay-labels "
                           "says)", choices=STRATEGIES)  # fmt: skip
    replay_weight: float | None = option(
        None, "mft: weight of the replay (pretraining) force objective (default 1)"
    )
    ewc_weight: float = option(
        0.0,
        "weight of elastic weight consolidation towards the starting weights (0: off); its "
        "Fisher is measured on --replay frames, else on the training frames",
    )
    freeze_layers: int | None = option(
        None, "freeze: layer groups frozen from the input (default: all but the head)"
    )
    llrd_decay: float | None = option(
        None, f"llrd: lr multiplier per group away from the head (default {DEFAULT_LLRD_DECAY})"
    )
    llrd_shape: str | None = option(
        None, "llrd: decay (from the head down) or u (middle lowest; default decay)",
        choices=LLRD_SHAPES,
    )  # fmt: skip
    target: str = option(
        "", "downstream property instead of a force field: its key in the frames, a "
        "per-structure value (e.g. homo_lumo_gap, xtb_dipole) or per-atom array (e.g. "
        "xtb_charges) (default: none, a force field)",
    )  # fmt: skip
    target_level: str | None = option(
        None, "--target: structure or atom (default: where the key is found)", choices=LEVELS
    )
    target_kind: str | None = option(
        None, "--target: scalar or vector (3 components; default: the first frame's shape)",
        choices=KINDS,
    )  # fmt: skip
    target_reduce: str | None = option(
        None, "--target per structure: sum (extensive) or mean (intensive) of the per-atom "
        "contributions (default: mean for a scalar, sum for a vector)", choices=REDUCTIONS,
    )  # fmt: skip
    target_unit: str = option(
        "", "--target: unit of the values as the frames store them (default: eV, e*Å, e for "
        "xTB's homo_lumo_gap, xtb_dipole, xtb_charges; else none)",
    )  # fmt: skip
    property_weight: float | None = option(
        None, "--target: weight of the property objective (default 1)"
    )
    lr: float = option(1e-3, "peak learning rate of the head (AdamW)")
    epochs: int = option(50, "maximum epochs")
    max_minutes: float = option(
        0.0, "wall-clock budget in minutes, resumed runs included (0: none)"
    )
    batch_size: int = option(8, "structures per optimiser step")
    energy_weight: float | None = option(
        None, "weight of the per-atom energy MSE of the downstream frames (default 1; with "
        "--target 0 unless given)",
    )  # fmt: skip
    forces_weight: float | None = option(
        None, "weight of the force-component MSE of the downstream frames (default 10; with "
        "--target 0 unless given) and of the mft replay objective (default 10)",
    )  # fmt: skip
    seed: int = option(0, "seed of the split and shuffling")
    no_maps: bool = option(False, "leave the t-SNE maps out of the report (they take seconds)")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    device: str = option("cpu", "torch device (cpu, cuda, cuda:1...)")
    compile: bool = option(
        False, "compile the training step whole (train.compile of trustpot train: faster steps "
        "after a first one that compiles; not with --target or --ewc-weight)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError`, naming the flag, for values that cannot work."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {STRATEGIES}, got '{self.strategy}'")
        if self.compile and (self.target or self.ewc_weight > 0):
            raise ConfigError("--compile takes force-field objectives only: not with --target "
                              "or --ewc-weight")  # fmt: skip
        for value, flag, owner in (
            (self.freeze_layers, "--freeze-layers", "freeze"),
            (self.llrd_decay, "--llrd-decay", "llrd"),
            (self.llrd_shape, "--llrd-shape", "llrd"),
            (self.replay_weight, "--replay-weight", "mft"),
        ):
            if value is not None and self.strategy != owner:
                raise ConfigError(
                    f"{flag} applies to --strategy {owner}, not --strategy {self.strategy}"
                )
        if self.llrd_decay is not None and not 0.0 < self.llrd_decay <= 1.0:
            raise ConfigError(f"--llrd-decay must be in (0, 1], got {self.llrd_decay}")
        if self.llrd_shape is not None and self.llrd_shape not in LLRD_SHAPES:
            raise ConfigError(f"--llrd-shape must be one of {LLRD_SHAPES}")
        if self.freeze_layers is not None and self.freeze_layers < 0:
            raise ConfigError(f"--freeze-layers must be >= 0, got {self.freeze_layers}")
        if self.replay_labels is not None and self.replay_labels not in REPLAY_LABELS:
            raise ConfigError(f"--replay-labels must be one of {REPLAY_LABELS}")
        if self.replay_labels is not None and not self.replay:
            raise ConfigError("--replay-labels needs --replay frames")
        if self.strategy == "mft" and not self.replay:
            raise ConfigError("--strategy mft needs --replay frames of the pretraining domain")
        if self.ewc_weight < 0:
            raise ConfigError(f"--ewc-weight must be >= 0, got {self.ewc_weight}")
        if self.ewc_weight > 0 and self.strategy == "freeze":
            raise ConfigError("--ewc-weight does not apply to --strategy freeze (frozen groups "
                              "cannot move; the head is new)")  # fmt: skip
        for value, flag in (
            (self.target_level, "--target-level"),
            (self.target_kind, "--target-kind"),
            (self.target_reduce, "--target-reduce"),
            (self.target_unit or None, "--target-unit"),
            (self.property_weight, "--property-weight"),
        ):
            if value is not None and not self.target:
                raise ConfigError(f"{flag} applies only with --target (a downstream property)")
        for value, flag, allowed in (
            (self.target_level, "--target-level", LEVELS),
            (self.target_kind, "--target-kind", KINDS),
            (self.target_reduce, "--target-reduce", REDUCTIONS),
        ):
            if value is not None and value not in allowed:
                raise ConfigError(f"{flag} must be one of {allowed}, got '{value}'")
        if self.target_level == "atom" and self.target_reduce is not None:
            raise ConfigError("--target-reduce applies to --target-level structure, not atom "
                              "(a per-atom property has no reduction)")  # fmt: skip
        if self.property_weight is not None and self.property_weight <= 0:
            raise ConfigError(f"--property-weight must be > 0, got {self.property_weight}")
        for flag, weight in (("--energy-weight", self.energy_weight),
                             ("--forces-weight", self.forces_weight)):  # fmt: skip
            if weight is not None and weight < 0:
                raise ConfigError(f"{flag} must be >= 0, got {weight}")
        if self.replay_weight is not None and self.replay_weight <= 0:
            raise ConfigError(f"--replay-weight must be > 0, got {self.replay_weight}")
        if self.valid and self.valid_fraction is not None:
            raise ConfigError("--valid-fraction and --valid exclude each other")
        if self.valid_fraction is not None and not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"--valid-fraction must be in (0, 1), got {self.valid_fraction}")
        for flag, number in (("--lr", self.lr), ("--epochs", self.epochs),
                             ("--batch-size", self.batch_size)):  # fmt: skip
            if number <= 0:
                raise ConfigError(f"{flag} must be positive, got {number}")

    @property
    def decay(self) -> float:
        """LLRD multiplier per group (default 0.7)."""
        return DEFAULT_LLRD_DECAY if self.llrd_decay is None else float(self.llrd_decay)

    @property
    def shape(self) -> str:
        """LLRD shape (default ``decay``)."""
        return self.llrd_shape or "decay"

    def downstream_weights(self) -> LossWeights | None:
        """Energy and force weights of the downstream frames' labels: 1 and 10 by default;
        with ``--target`` none (``None``) unless ``--energy-weight`` or ``--forces-weight`` is
        given (then the other is 0)."""
        if self.target and self.energy_weight is None and self.forces_weight is None:
            return None
        default_e, default_f = (0.0, 0.0) if self.target else (1.0, 10.0)
        e = default_e if self.energy_weight is None else float(self.energy_weight)
        f = default_f if self.forces_weight is None else float(self.forces_weight)
        return LossWeights(e, f, 0.0)

    @property
    def replay_forces_weight(self) -> float:
        """Force weight of the mft replay objective (``--forces-weight``, default 10)."""
        return 10.0 if self.forces_weight is None else float(self.forces_weight)

    def required_labels(self) -> tuple[str, ...]:
        """Labels every downstream frame must carry: energy and forces for a force field;
        with ``--target``, those its given weights use."""
        if not self.target:
            return ("energy", "forces")
        w = self.downstream_weights()
        if w is None:
            return ()
        return tuple(n for n, v in (("energy", w.energy), ("forces", w.forces)) if v > 0)

    def frozen_count(self, n_groups: int) -> int:
        """Groups frozen from the input (``freeze``: default all but the last, with
        ``--target`` all of them, the property head being the head; else 0).

        Raises:
            ConfigError: ``--freeze-layers`` above the number of groups.
        """
        if self.strategy != "freeze":
            return 0
        default = n_groups if self.target else n_groups - 1
        k = default if self.freeze_layers is None else self.freeze_layers
        if k > n_groups:
            raise ConfigError(f"--freeze-layers {k}: the model has only {n_groups} layer groups")
        return k

    def train_config(self) -> TrainConfig:
        """The trainer's options (cosine schedule, warm-up of a tenth of the epochs up to 5,
        EMA 0.99; the rest as ``trustpot train``)."""
        w = self.downstream_weights() or LossWeights(0.0, 0.0, 0.0)
        return TrainConfig(
            epochs=self.epochs, max_minutes=self.max_minutes, batch_size=self.batch_size,
            lr=self.lr, warmup_epochs=min(5, self.epochs // 10), min_lr=min(1e-6, self.lr),
            energy_weight=w.energy, forces_weight=w.forces,
            seed=self.seed, threads=self.threads, device=self.device,
            compile="always" if self.compile else "never",  # fine-tuning: the flag decides
        )  # fmt: skip


def strategy_rates(names: list[str], opts: FinetuneOptions) -> list[tuple[str, float, bool]]:
    """``(name, peak lr, frozen)`` of each layer group ``names`` (ordered input -> output).

    ``full``: every group at ``lr``. ``freeze``: the first :meth:`~FinetuneOptions.
    frozen_count` groups frozen, the others at ``lr``. ``llrd`` with ``n`` groups, group ``k``
    (0 = input): shape ``decay`` gives ``lr * d**(n - 1 - k)`` (the head at ``lr``, each group
    below ``d`` times the one above); shape ``u`` gives ``lr * d**min(k, n - 1 - k)`` (embedding
    and head at ``lr``, the middle interaction layers lowest, as JMP fine-tunes).
    """
    n = len(names)
    frozen = opts.frozen_count(n)
    out = []
    for k, name in enumerate(names):
        rate = opts.lr
        if opts.strategy == "llrd":
            depth = n - 1 - k if opts.shape == "decay" else min(k, n - 1 - k)
            rate = opts.lr * opts.decay**depth
        out.append((name, rate, k < frozen))
    return out


def _param_groups(
    model: FineTuned, opts: FinetuneOptions
) -> tuple[list[ParamGroup], list[dict[str, Any]]]:
    """AdamW groups of the base's layer groups per strategy, plus the offsets and the
    property head (trained with ``--target``, else kept as it is) at ``lr``."""
    groups = model.base.layer_groups()
    rates = strategy_rates([name for name, _ in groups], opts)
    out, table = [], []
    for (name, params), (_, rate, frozen) in zip(groups, rates):
        out.append(ParamGroup(params, lr=rate, frozen=frozen, name=name))
        n = sum(p.numel() for p in params)
        table.append({"name": name, "lr": 0.0 if frozen else rate, "frozen": frozen, "params": n})
    out.append(ParamGroup([model.offsets], lr=opts.lr, name="offsets"))
    table.append({"name": "offsets", "lr": opts.lr, "frozen": False, "params": 119})
    if model.head is not None:
        params = list(model.head.parameters())
        frozen = not opts.target
        out.append(ParamGroup(params, lr=opts.lr, frozen=frozen, name="property_head"))
        n = sum(p.numel() for p in params)
        table.append({"name": "property_head", "lr": 0.0 if frozen else opts.lr,
                      "frozen": frozen, "params": n})  # fmt: skip
    return out, table


def run_finetune(opts: FinetuneOptions, out: str | Path, resume: bool = False) -> TrainResult:
    """Fine-tune ``opts.base`` on ``opts.train`` and write the run folder ``out``.

    Writes ``config.resolved.yaml``, ``split.json``, ``log.txt``, ``finetune.json``,
    ``metrics.csv``, ``best.ckpt`` (kind ``finetuned``), ``last.ckpt`` and the report
    (``report.json``, ``report.md``, ``tsne_*.png`` unless ``--no-maps``). With ``resume``,
    continues the run in ``out`` (same options required) from its ``last.ckpt``, and writes
    the report again.

    Raises:
        ConfigError: ``out`` holds a run and ``resume`` is false (or the reverse), other
            options than the run being resumed, unknown elements, too many frozen groups.
        DataError: ``--replay-labels given`` and a replay frame without forces.
    """
    out = Path(out)
    info = init_distributed()
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    last = out / "last.ckpt"
    log = open_run_dir(out, resume, info.is_main)

    all_train = read_data(opts.train, require=opts.required_labels())
    fraction = 0.1 if opts.valid_fraction is None else opts.valid_fraction
    given = read_data(opts.valid, require=opts.required_labels()) if opts.valid else None
    checked = [(given, opts.valid)] if given is not None else []
    target = resolve_target(opts, all_train, opts.train, checked) if opts.target else None
    train_idx, val_idx, valid = train_and_valid(all_train, given, fraction, opts.seed)
    train = [all_train[i] for i in train_idx]
    test = read_data(opts.test_ood) if opts.test_ood else []
    replay, replay_labels = replay_frames(opts)
    device = torch.device(opts.device)

    origin = load_model(opts.base)  # loaded once: the start, the replay labels, EWC, the report
    if resume:
        model = FineTuned.from_payload(read_checkpoint(last), str(last))
    else:
        start = copy.deepcopy(origin)  # trained in place; ``origin`` stays as it was
        model = start if isinstance(start, FineTuned) else FineTuned(start)
        if target is not None:
            attach_head(model, target, train, opts.train, log)
    check_species(train, model.species, opts.train)
    check_species(valid, model.species, opts.valid or opts.train)
    check_species(test, model.species, opts.test_ood)
    check_species(replay, model.species, opts.replay)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise ConfigError(f"--device '{opts.device}' is not usable here: {err}") from None
    scale = force_rms(train)
    groups, table = _param_groups(model, opts)
    ff = opts.downstream_weights()  # the downstream frames' energy and force labels, if used
    if not resume and ff is not None and (not opts.target or ff.energy > 0):
        fitted, before, after = fit_energy_offsets(model, train, opts.batch_size)
        with torch.no_grad():
            for z, value in fitted.items():
                model.offsets[z] += value
        log(
            f"energy offsets fitted on {len(train)} structures: RMS residual "
            f"{1000 * before:.1f} -> {1000 * after:.1f} meV/atom"
        )
    tcfg = opts.train_config()
    run_config = {"finetune": dataclasses.asdict(opts), "train": dataclasses.asdict(tcfg)}
    if info.is_main and not resume:
        (out / "config.resolved.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        split = {"train_file": opts.train, "seed": opts.seed, "train_indices": train_idx,
                 "valid_indices": val_idx, "valid_file": opts.valid or None}  # fmt: skip
        (out / "split.json").write_text(json.dumps(split))
        summary = {
            "from": opts.base,
            "base_kind": model.base.kind,
            "strategy": opts.strategy,
            "force_scale": scale,
            "offsets": {str(z): v for z, v in model.offsets_by_element().items()},
            "groups": table,
            "replay_labels": replay_labels or None,
        }
        if model.head is not None:
            summary["property_head"] = {
                **model.head.target.to_dict(), "trained": bool(opts.target),
                "shift": float(model.head.shift), "scale": float(model.head.scale),
            }  # fmt: skip
        (out / "finetune.json").write_text(json.dumps(summary, indent=1))
    n_train = sum(p.numel() for g in groups if not g.frozen for p in g.params)
    log(
        f"{'resuming' if resume else 'fine-tuning'} {model.base.kind} ({opts.base}), strategy "
        f"{opts.strategy}: {n_train} trainable parameters in "
        f"{sum(not g.frozen for g in groups)} of {len(groups)} groups, on {len(train)} "
        f"structures, validating on {len(valid)}; force scale {scale:.4g} eV/Å"
    )
    specs, dtype = model.neighbor_lists(), model.dtype
    train_ds = downstream_data(model, train, specs, dtype, opts.train, bool(opts.target))
    valid_ds = downstream_data(
        model, valid, specs, dtype, opts.valid or opts.train, bool(opts.target)
    )
    objectives = [property_objective(model, opts)] if opts.target else []
    if ff is not None:  # the downstream labels: the objective, or one beside the property's
        name = "forcefield" if opts.target else "main"
        objectives.append(Objective(name, "main", ff, loss=ForceFieldLoss(ff, scale)))
    train_sets: dict[str, TrainerDataset] = {"main": train_ds}
    valid_sets: dict[str, TrainerDataset] = {"main": valid_ds}
    if opts.strategy == "mft":
        if replay_labels == "pseudo":
            labelled = pseudo_labelled_replay(origin, opts, out, info.is_main, log, replay)
        else:
            labelled = replay
            log(f"replay: {len(replay)} frames of {opts.replay} with their given force labels")
        replay_ds = GraphDataset(labelled, specs, dtype, f"replay ({replay_labels} labels)")
        # forces only: the downstream energy zero differs, and the offsets must follow it
        replay_weights = LossWeights(0.0, opts.replay_forces_weight, 0.0)
        weight = 1.0 if opts.replay_weight is None else opts.replay_weight
        # a property target without downstream forces: the replay forces set their own scale
        own = ff is None or ff.forces == 0
        loss = ForceFieldLoss(replay_weights, force_rms(labelled) if own else scale)
        objectives.append(Objective("replay", "replay", replay_weights, weight, loss=loss))
        train_sets["replay"] = replay_ds
        valid_sets["replay"] = replay_ds
    if opts.ewc_weight > 0:
        frames = replay or train
        penalty = ewc_penalty(origin, opts, scale, frames, specs, dtype, device)
        objectives.append(Objective("ewc", "ewc", weight=opts.ewc_weight, loss=penalty))
        train_sets["ewc"] = valid_sets["ewc"] = full_batch(0, "EWC penalty")  # batch unused
    trainer = Trainer(
        model, objectives, tcfg, info, run_config=run_config, param_groups=groups,
        desc="finetune",
    )  # fmt: skip
    if resume:
        trainer.resume(out)
        log(f"resumed at epoch {trainer.epoch} ({trainer.elapsed / 60:.1f} min used)")
    result = trainer.fit(train_sets, valid_sets, out, log=log)
    if info.is_main:
        write_report(origin, opts, out, valid, log, replay, replay_labels, test)
    return result


def replay_frames(opts: FinetuneOptions) -> tuple[list[Structure], str]:
    """The ``--replay`` frames (labels optional) and the labels they train and are judged
    with: ``given`` or ``pseudo`` (``--replay-labels``; ``auto``: given when every frame has
    forces). No ``--replay``: no frames and ``""``.

    Raises:
        DataError: ``--replay-labels given`` and a frame without forces (naming file and frame).
    """
    if not opts.replay:
        return [], ""
    frames = read_data(opts.replay, require=())
    choice = opts.replay_labels or "auto"
    missing = next((k for k, s in enumerate(frames) if s.forces is None), None)
    if choice == "given" and missing is not None:
        why = "--replay-labels given needs forces on every frame (else: pseudo or auto)"
        raise DataError(opts.replay, why, missing, "forces")
    if choice == "auto":
        choice = "given" if missing is None else "pseudo"
    return frames, choice


def ewc_penalty(
    start: Model, opts: FinetuneOptions, scale: float, frames: list[Structure], specs: Any,
    dtype: torch.dtype, device: torch.device,
) -> EWCPenalty:  # fmt: skip
    """The EWC objective: the Fisher of the starting model's weights on ``frames`` and those
    weights as the anchor, both of ``start`` (the untouched ``--from`` model, so a resumed run
    anchors to the same start); the new per-element offsets are not anchored."""
    model = (start if isinstance(start, FineTuned) else FineTuned(start)).to(device)
    names = {n for n, _ in model.named_parameters() if n.startswith("base.")}
    data = GraphDataset(frames, specs, dtype, "EWC frames")
    batches = (to_device(b, device) for b, _ in data.batches(opts.batch_size) if b is not None)
    fisher = fisher_diagonal(model, batches, names, scale, seed=opts.seed)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
    return EWCPenalty(fisher, anchor)


def pseudo_labelled_replay(
    start: Model,
    opts: FinetuneOptions,
    out: Path,
    main: bool,
    log: Callable[[str], None],
    frames: list[Structure],
) -> list[Structure]:
    """The ``--replay`` ``frames`` labelled with the starting model's energies and forces
    (pseudo-labels), computed once and cached in ``out/replay_pseudo.xyz`` (written atomically;
    a resumed or repeated run reads it back)."""
    cache = out / "replay_pseudo.xyz"
    if not cache.is_file():
        if main:
            preds = Predictor(start, batch_size=opts.batch_size).predict_structures(frames)
            labelled = [
                dataclasses.replace(s, energy=float(p[K.ENERGY]), forces=p[K.FORCES], stress=None)
                for s, p in zip(frames, preds)
            ]
            tmp = cache.with_name(cache.name + ".tmp")
            write(tmp, [s.to_atoms() for s in labelled], format="extxyz")
            tmp.replace(cache)
            log(f"replay: {len(labelled)} frames of {opts.replay} pseudo-labelled by {opts.base}")
        barrier(init_distributed())
    return read_data(str(cache))


def write_report(
    before: Model,
    opts: FinetuneOptions,
    out: Path,
    valid: list[Structure],
    log: Callable[[str], None],
    replay: list[Structure] | None = None,
    replay_labels: str = "",
    test: list[Structure] | None = None,
) -> dict[str, Any]:
    """The report of ``best.ckpt`` against the model it started from, ``before``.

    Downstream error on ``valid`` (in domain) and ``test`` (``--test-ood``), with the start
    taken at step 0 (``before`` plus the offsets of ``finetune.json``); forgetting and drift on
    ``replay`` (``--replay``; else ``valid``, against pseudo-labels), forgetting against the
    replay frames' labels when ``replay_labels`` is ``given``; t-SNE maps (unless
    ``--no-maps``). Writes
    ``out/report.json``, ``out/report.md`` and the PNGs; the verdict line goes to the log.
    """
    after = load_model(out / "best.ckpt")
    summary = json.loads((out / "finetune.json").read_text())
    start = with_offsets(before, {int(z): v for z, v in summary["offsets"].items()})
    sets = {"in_domain": (f"validation ({opts.valid or opts.train})", valid)}
    if test:
        sets["out_of_domain"] = (opts.test_ood, test)
    downstream = downstream_errors(start, after, sets)
    frames = replay or valid
    source = opts.replay or "validation"
    emb = compare_embeddings(before, after, frames)
    report = finetune_report(
        before, after, frames, source, emb, replay_labels == "given" and bool(replay), downstream
    )
    report["from"], report["strategy"] = opts.base, opts.strategy
    skipped = {"skipped": "not requested (--no-maps)"}
    report["maps"] = skipped if opts.no_maps else tsne_maps(emb, out, seed=opts.seed)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    log(f"report: {report['verdict']}")
    return report
