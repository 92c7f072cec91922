"""Typed, frozen run configuration: YAML file plus ``-o section.key=value`` overrides.

Unknown keys are errors, values are converted to the declared types, and the fully resolved
configuration is written next to every run (``config.resolved.yaml``). ``trustpot config
show`` prints the defaults with their documentation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from trustpot.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Config = TypeVar("_Config", bound="DataclassInstance")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is.

    Attributes:
        train: training file (any ASE format) or split manifest.
        valid: validation file; when empty, ``valid_fraction`` of ``train`` is held out.
        valid_fraction: share of ``train`` held out for validation when ``valid`` is empty.
        isolated_atoms: file of one-atom structures whose energies are the reference
            energies; when empty they are fitted by least squares.
        energy_key: name of the energy label in the files.
        forces_key: name of the force label.
        stress_key: name of the stress label.
        energy_unit: unit of energies in the files.
        length_unit: unit of lengths in the files.
        max_train: use at most this many training structures (0: all), chosen with the seed.
    """

    train: str = ""
    valid: str = ""
    valid_fraction: float = 0.05
    isolated_atoms: str = ""
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    energy_unit: str = "eV"
    length_unit: str = "Å"
    max_train: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model.

    Attributes:
        name: backbone (``schnet``, ``painn``, ``egnn``, ``ace``, ``deepset-moe``).
        dtype: ``float32`` or ``float64``.
        hypers: backbone hyper-parameters (see ``trustpot config show``).
        head_dropout: dropout in the energy head (needed by MC dropout).
        init_from: warm start: a potential checkpoint whose weights, species and reference
            energies the run starts from (same backbone, dtype, head dropout and any hyper set
            here); empty: a new model initialised with the seed.
    """

    name: str = "painn"
    dtype: str = "float32"
    hypers: dict[str, Any] = dataclasses.field(default_factory=dict)
    head_dropout: float = 0.0
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: maximum number of passes over the training data.
        max_minutes: wall-clock budget in minutes, resumed runs included (0: none).
        batch_size: structures per optimiser step (summed over processes); 4 with ``lr`` 1e-2
            was measured better than 8 with 5e-3 at a fixed CPU budget (``docs/backbones.md``).
        batching: ``structures`` (batches of ``batch_size`` structures), ``atoms``
            (shuffled structures packed into batches of at most ``batch_size`` times the mean
            structure's atoms and edges: ``batch_size`` structures on average, a steady
            number of atoms each, so that a static-shape step, ``compile`` or
            ``cuda_graphs``, pads little where structures differ in size; README, "A
            compiled step"), or ``auto``: ``atoms`` for a static-shape step on datasets of
            structures, else ``structures``.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        schedule: ``plateau`` (reduce on validation plateau) or ``cosine`` (warm-up, then
            cosine decay over the budget: epochs or minutes, whichever ends first).
        warmup_epochs: linear warm-up length (cosine schedule).
        lr_factor: factor of the plateau schedule.
        lr_patience: epochs without improvement before the plateau schedule lowers the rate.
        min_lr: floor of the learning rate.
        ema_decay: decay of the exponential moving average of weights (0 disables EMA).
        patience: stop after this many epochs without validation improvement (0: never).
        clip_grad: gradient-norm clipping threshold (0: none).
        energy_weight: weight of the per-atom energy MSE (in units of the force scale).
        forces_weight: weight of the force-component MSE.
        stress_weight: weight of the stress MSE (used only where stress labels exist).
        stage_two_fraction: share of the budget at its end trained with the second stage's
            weights (MACE's second stage; 0: none).
        stage_two_energy_weight: energy weight of the second stage.
        stage_two_forces_weight: force weight of the second stage.
        loss: ``mse`` or ``huber``.
        huber_delta: Huber threshold in units of the force scale.
        seed: seed of initialisation, shuffling and splits.
        threads: torch CPU threads per process (0: torch's default).
        checkpoint_every: write ``last.ckpt`` every this many epochs.
        device: torch device (``cpu``, ``cuda``, ``cuda:1``...).
        cuda_graphs: record the training step once as a CUDA graph and replay it (batches
            padded to one shape, ``trustpot.train.static_step``): ``auto`` on a single CUDA
            device whenever the run allows it (force-field objectives on plain datasets,
            stress labels included), ``always`` insists (an error says why a run cannot),
            ``never`` never.
        compile: compile the step's loss and gradient whole (``torch.compile`` of a
            ``torch.func`` step, ``trustpot.train.compiled_step``): faster steps after a
            first one that compiles (about a minute). ``always`` from the first step (a run
            it cannot serve, a non-force-field loss or data-parallel training, is an error),
            ``never``, or ``auto``: on a single CPU process, from the second epoch when the
            first shows at least 10 minutes of training left, kept only if it measures
            faster (``trustpot.train.auto_compile``). ``true`` / ``false`` mean ``always`` /
            ``never``.
    """

    epochs: int = 1000
    max_minutes: float = 0.0
    batch_size: int = 4
    batching: str = "auto"
    lr: float = 1e-2
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 5
    lr_factor: float = 0.8
    lr_patience: int = 20
    min_lr: float = 1e-5
    ema_decay: float = 0.99
    patience: int = 0
    clip_grad: float = 100.0
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 1.0
    stage_two_fraction: float = 0.0
    stage_two_energy_weight: float = 100.0
    stage_two_forces_weight: float = 10.0
    loss: str = "mse"
    huber_delta: float = 0.1
    seed: int = 0
    threads: int = 0
    checkpoint_every: int = 1
    device: str = "cpu"
    cuda_graphs: str = "auto"
    compile: str = "auto"

    def __post_init__(self) -> None:
        # YAML reads ``true`` / ``false`` as booleans (and older configs stored one)
        legacy = {"true": "always", "false": "never", "1": "always", "0": "never"}
        value = str(self.compile).lower()
        object.__setattr__(self, "compile", legacy.get(value, value))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        t = self.train
        if t.schedule not in ("plateau", "cosine"):
            raise ConfigError(f"train.schedule must be 'plateau' or 'cosine', got '{t.schedule}'")
        if t.cuda_graphs not in ("auto", "always", "never"):
            raise ConfigError(
                f"train.cuda_graphs must be auto, always or never, got '{t.cuda_graphs}'"
            )
        if t.cuda_graphs == "always" and not t.device.startswith("cuda"):
            raise ConfigError(
                f"train.cuda_graphs=always needs a CUDA device; train.device is '{t.device}'"
            )
        if t.compile not in ("auto", "always", "never"):
            raise ConfigError(
                f"train.compile must be auto, always or never (or true / false), got '{t.compile}'"
            )
        if t.batching not in ("auto", "structures", "atoms"):
            raise ConfigError(
                f"train.batching must be auto, structures or atoms, got '{t.batching}'"
            )
        if t.loss not in ("mse", "huber"):
            raise ConfigError(f"train.loss must be 'mse' or 'huber', got '{t.loss}'")
        if t.batch_size < 1 or t.epochs < 1 or t.lr <= 0:
            raise ConfigError("train.batch_size, train.epochs and train.lr must be positive")
        if not 0.0 <= t.stage_two_fraction < 1.0:
            raise ConfigError(
                f"train.stage_two_fraction must be in [0, 1), got {t.stage_two_fraction}"
            )
        if t.stage_two_fraction > 0 and (
            min(t.energy_weight, t.forces_weight) <= 0
            or min(t.stage_two_energy_weight, t.stage_two_forces_weight) <= 0
        ):
            raise ConfigError(
                "train.stage_two_fraction needs positive energy and force weights in both stages"
            )
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if not 0.0 < self.data.valid_fraction < 1.0 and not self.data.valid:
            raise ConfigError("data.valid_fraction must be in (0, 1) when data.valid is empty")
        if self.model.dtype not in ("float32", "float64"):
            raise ConfigError(f"model.dtype must be float32 or float64, got '{self.model.dtype}'")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    hint = annotation
    if isinstance(hint, str):
        hint = eval(hint, {"Any": Any, "dict": dict})  # annotations are simple builtins here
    origin = typing.get_origin(hint)
    if hint is Any or origin is dict or hint is dict:
        if origin is dict and not isinstance(value, dict):
            raise ConfigError(f"{where} expects a mapping, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        return value
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} expects {hint.__name__}, got {value!r}") from None
    return value


def _build(cls: type[_Config], values: dict[str, Any], where: str) -> _Config:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {[f'{where}{u}' for u in unknown]}; known: "
            f"{sorted(where + k for k in fields)}"
        )
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name} must be a section (mapping)")
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _convert(value, hint, f"{where}{name}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (``["train", "lr"]``, ``0.001``); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Read a YAML file (optional), apply ``base`` then ``overrides``, validate.

    Args:
        path: YAML file with sections ``data``, ``model``, ``train``.
        overrides: ``section.key=value`` strings (``model.hypers.n_features=128`` works).
        base: values set by command-line flags, applied after the file and before overrides.
    """
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded or {}
    for section, values in (base or {}).items():
        tree.setdefault(section, {}).update(values)
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    cfg = _build(RunConfig, tree, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def describe_defaults() -> str:
    """Every option with its default and documentation, for ``trustpot config show``."""
    lines = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        docs = _attribute_docs(cls)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            default: Any = f.default
            if default is dataclasses.MISSING and callable(f.default_factory):
                default = f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)


def _attribute_docs(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        if (
            ":" in stripped
            and not line.startswith(" " * 12)
            and stripped.split(":")[0].isidentifier()
        ):
            current, text = stripped.split(":", 1)
            out[current] = text.strip()
        elif current and stripped:
            out[current] += " " + stripped
    return out
