"""``trustpot`` command: subcommands are thin layers over library functions.

Every subcommand sets two functions: ``resolve(args) -> options`` (pure: the options object
the flags describe, validated) and ``run(options) -> exit code``.

Errors that bad input causes print one line (``trustpot: error: ...``) and exit with 2; the
full traceback goes to ``error.log`` in the output folder (or the current folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustpot.cli.flags import add_flags, from_args, option
from trustpot.errors import ConfigError, TrustpotError

if TYPE_CHECKING:
    from trustpot.config import RunConfig
    from trustpot.policy import TrustPolicy


def _add_train(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("train", help="train a potential", description="Train a potential.")
    from trustpot.cli.trainargs import add_training_flags

    add_training_flags(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(resolve=_resolve_train, run=_train, out_dir=lambda a: a.out)


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    """``trustpot train``: the resolved run configuration, the run folder, resume or not."""

    config: RunConfig
    out: str
    resume: bool


def _resolve_train(args: argparse.Namespace) -> TrainRequest:
    from trustpot.cli.trainargs import config_from_args

    return TrainRequest(config_from_args(args), args.out, args.resume)


def _train(req: TrainRequest) -> int:
    from trustpot.train.run import run_training

    run_training(req.config, req.out, resume=req.resume)
    return 0


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """``trustpot eval``."""

    checkpoint: str = option("", "potential or reliability wrapper checkpoint", positional=True)
    data: str = option("", "labelled data file (any ASE format) or split.json:SUBSET",
                       positional=True)  # fmt: skip
    out: str = option("", "output folder", required=True)
    batch_size: int = option(32, "structures per call")
    device: str = option("cpu", "torch device (cpu, cuda, cuda:1...)")


def _add_eval(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on labelled data",
        description="Write DIR/metrics.json and DIR/parity.png.",
    )
    add_flags(p, EvalOptions)
    p.set_defaults(resolve=lambda a: from_args(EvalOptions, a), run=_eval, out_dir=lambda a: a.out)


def _eval(opts: EvalOptions) -> int:
    import json

    from trustpot.calculator import Predictor
    from trustpot.data.splits import read_data
    from trustpot.evaluate import evaluate_file

    predictor = Predictor.from_checkpoint(opts.checkpoint, opts.device, opts.batch_size)
    structures = read_data(opts.data, require=())
    metrics = evaluate_file(predictor, structures, opts.out, source=opts.data)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(json.dumps(summary, indent=1))
    return 0


@dataclasses.dataclass(frozen=True)
class MDRunOptions:
    """``trustpot md``."""

    checkpoint: str = option("", "potential or reliability wrapper checkpoint", positional=True)
    structure: str = option("", "starting structure (first frame of any ASE file)",
                            positional=True)  # fmt: skip
    steps: int = option(0, "MD steps", required=True)
    temperature: float = option(0.0, "temperature, K", required=True)
    timestep: float = option(0.5, "time step, fs")
    friction: float = option(0.01, "Langevin friction, 1/fs")
    thermostat: str = option("langevin", "langevin (NVT) or nve", choices=("langevin", "nve"))
    interval: int = option(10, "write every N steps")
    seed: int = option(0, "seed of the initial velocities and the thermostat")
    skin: float = option(
        1.0, "Verlet skin of the neighbour lists, Å: rebuilt only when an atom has moved "
        "half of it (0: a fresh list every step)",
    )  # fmt: skip
    compile: str = option(
        "auto", "evaluate through torch.compile (a plain potential, or a deep ensemble whose "
        "members stack): faster steps on small molecules after a one-off compilation of "
        "seconds, forces equal to the eager ones to float rounding. auto: compile once the run "
        "has shown at least 5 minutes of MD left and a compiled step proves 1.1x faster; "
        "always (also a bare --compile); never: eager, reproducible to the last bit",
        choices=("auto", "always", "never"), nargs="?", const="always",
    )  # fmt: skip
    warn: tuple[str, ...] = option(
        (), "log a line when the rule holds (checked on written frames; repeatable)",
        action="append", metavar="RULE",
    )  # fmt: skip
    harvest: tuple[str, ...] = option(
        (), "append the frame with its uncertainties, step and score to --harvest-file when "
        "the rule holds (checked on written frames; repeatable)",
        action="append", metavar="RULE",
    )  # fmt: skip
    harvest_file: str = option("", "extxyz file of harvested frames (default OUT.harvest.xyz)")
    halt: tuple[str, ...] = option(
        (), "stop when the rule holds, checked every step: one-line message, exit code 3, "
        "the trajectory so far kept (repeatable)",
        action="append", metavar="RULE",
    )  # fmt: skip
    stop_below: float | None = option(None, "alias of --halt reliability<R (older spelling)")
    out: str = option("", "trajectory (.traj or .xyz)", required=True)


@dataclasses.dataclass(frozen=True)
class MDRequest:
    """``trustpot md``: the options, the trust policy they describe and the harvest file."""

    options: MDRunOptions
    policy: TrustPolicy
    harvest_file: str | None


MD_EPILOG = """\
trust rules (RULE of --warn, --harvest, --halt):
  force-error>T@P    some atom's force error exceeds T eV/Å with probability >= P
                     (Gaussian components with the calibrated std; |error| is chi, 3 dof)
  force-std>T        some atom's force std (per component) exceeds T eV/Å (recalibrated
                     when the wrapper was fitted with --calibration)
  frame-force-std>T  the frame's mean force std exceeds T eV/Å
  reliability<R      the frame's reliability is below R (PROBE, or a recalibrated std method)
Every run also halts on a non-finite energy, force or uncertainty before writing it.
Quote each rule (a shell reads > and < as redirections), e.g.
  --warn 'force-std>0.05' --harvest 'force-std>0.1' --halt 'force-error>0.3@0.95'
"""


def _add_md(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "md",
        help="run molecular dynamics with a checkpoint",
        description="Langevin (NVT) or NVE dynamics through ASE, with optional trust rules "
        "that warn, harvest uncertain frames or halt.",
        epilog=MD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, MDRunOptions)
    p.set_defaults(resolve=_resolve_md, run=_md, out_dir=lambda a: str(Path(a.out).parent))


def _resolve_md(args: argparse.Namespace) -> MDRequest:
    """The options, with the rules parsed (errors name the flag) and the harvest file set."""
    from trustpot.policy import TrustPolicy, parse_rule

    opts = from_args(MDRunOptions, args)
    rules = TrustPolicy.from_specs(opts.warn, opts.harvest, opts.halt, flags=True).rules
    if opts.stop_below is not None:
        rules += (parse_rule(f"reliability<{opts.stop_below!r}", "halt", "--stop-below"),)
    policy = TrustPolicy(rules)
    harvest_file = opts.harvest_file or None
    if policy.of("harvest"):
        harvest_file = harvest_file or opts.out + ".harvest.xyz"
    elif harvest_file is not None:
        raise ConfigError("--harvest-file needs at least one --harvest RULE")
    return MDRequest(opts, policy, harvest_file)


def _finite_or_null(stats: dict[str, float]) -> dict[str, float | None]:
    """MD statistics as valid JSON: a value with no meaning yet (NaN) becomes null."""
    return {k: v if math.isfinite(v) else None for k, v in stats.items()}


def _md(req: MDRequest) -> int:
    import json

    from trustpot.calculator import TrustpotCalculator
    from trustpot.data.reader import read_structures
    from trustpot.data.structures import check_species
    from trustpot.md import run_md
    from trustpot.monitor import TrustHalt

    opts = req.options
    if not opts.skin >= 0:
        raise ConfigError(f"--skin must be >= 0 Å, got {opts.skin}")
    calc = TrustpotCalculator.from_checkpoint(opts.checkpoint, skin=opts.skin)
    (start,) = read_structures(opts.structure, require=(), index=0)
    check_species([start], calc.predictor.species, opts.structure)
    try:
        stats = run_md(
            calc,
            start.to_atoms(with_labels=False),
            opts.steps,
            opts.temperature,
            opts.out,
            timestep_fs=opts.timestep,
            friction=opts.friction,
            thermostat=opts.thermostat,
            interval=opts.interval,
            seed=opts.seed,
            policy=req.policy,
            harvest_file=req.harvest_file,
            compile=opts.compile,
        )
    except TrustHalt as halt:
        print(json.dumps(_finite_or_null(halt.stats), indent=1))
        frames = int(halt.stats.get("frames", 0))
        kept = (
            f"trajectory kept: {opts.out} ({frames} frames)"
            if frames
            else f"no frame written to {opts.out} (the start frame itself halted)"
        )
        print(f"trustpot: halted at {halt.event.message()}; {kept}", file=sys.stderr)
        return 3
    print(json.dumps(_finite_or_null(stats), indent=1))
    return 0


@dataclasses.dataclass(frozen=True)
class FinetuneRequest:
    """``trustpot finetune``: the options, the run folder, resume or not."""

    options: Any
    out: str
    resume: bool


def _add_finetune(sub: argparse._SubParsersAction[Any]) -> None:
    from trustpot.finetune import FinetuneOptions

    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint or pretrained model on new data",
        description="Wrap --from with per-element energy offsets (fitted by least squares "
        "first), then train it on --train with the --strategy's layer groups: full, freeze "
        "(the first --freeze-layers groups fixed), llrd (layer-wise learning-rate decay) or "
        "mft (plus the pretraining force field on --replay frames). With --target KEY, the "
        "downstream objective is a property read from the frames, predicted by a new head on "
        "the per-atom features. Writes OUT/best.ckpt "
        "(kind finetuned), last.ckpt, metrics.csv, finetune.json and the report: report.md, "
        "report.json, tsne_element.png, tsne_environment.png (downstream error in and out of "
        "domain, forgetting, drift per layer, and a one-line verdict).",
    )
    add_flags(p, FinetuneOptions)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.set_defaults(resolve=_resolve_finetune, run=_finetune, out_dir=lambda a: a.out)


def _resolve_finetune(args: argparse.Namespace) -> FinetuneRequest:
    from trustpot.finetune import FinetuneOptions

    return FinetuneRequest(from_args(FinetuneOptions, args), args.out, args.resume)


def _finetune(req: FinetuneRequest) -> int:
    from trustpot.finetune import run_finetune

    run_finetune(req.options, req.out, resume=req.resume)
    return 0


def _add_config(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("config", help="show the options and their defaults")
    p.add_argument("action", choices=["show"])
    p.set_defaults(resolve=lambda a: a.action, run=_config, out_dir=lambda a: ".")


def _config(action: str) -> int:
    from trustpot.config import describe_defaults

    print(describe_defaults())
    return 0


def _add_quickstart(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the main job on data made here: xTB data, training, in/out-of-domain evaluation",
        description="Sample a molecule with GFN2-xTB at 300 K and a hotter temperature, train a "
        "potential, evaluate it in and out of domain, write report.md (needs the [xtb] extra).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--smiles", default="CCO")
    p.add_argument("--frames", type=int, default=300, help="frames at 300 K (default 300)")
    p.add_argument("--ood-frames", type=int, default=100)
    p.add_argument("--ood-temperature", type=float, default=800.0, help="K (default 800)")
    p.add_argument("--model", default="painn")
    p.add_argument("--minutes", type=float, default=4.0, help="training budget (default 4)")
    p.add_argument(
        "--uq-minutes", type=float, default=1.0, help="reliability fine-tuning budget (default 1)"
    )
    p.add_argument("--workers", type=int, default=2, help="xTB worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(resolve=_resolve_quickstart, run=_quickstart, out_dir=lambda a: a.out)


def _resolve_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from trustpot.quickstart import QuickstartOptions

    opts = QuickstartOptions(
        smiles=args.smiles, frames=args.frames, ood_frames=args.ood_frames,
        ood_temperature=args.ood_temperature, model=args.model, minutes=args.minutes,
        uq_minutes=args.uq_minutes,
        workers=args.workers, seed=args.seed,
    )  # fmt: skip
    return {"out": args.out, "options": opts}


def _quickstart(req: dict[str, Any]) -> int:
    from trustpot.quickstart import run_quickstart

    summary = run_quickstart(req["out"], req["options"])
    print(f"report: {Path(req['out']) / 'report.md'} ({summary['total_s'] / 60:.1f} min)")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction[Any]) -> None:
    from trustpot.pretrain import PretrainOptions

    p = sub.add_parser(
        "pretrain",
        help="build trustpot-mol: GFN2-xTB corpus, split by molecule, PaiNN, model card",
        description="Sample the molecule corpus with GFN2-xTB (needs the [xtb] extra), split it "
        "by molecule, train PaiNN within --minutes, evaluate on the held-out molecules and write "
        "OUT/card.md, OUT/card.json and OUT/trustpot-mol.ckpt. Rerun to reuse finished steps.",
    )
    add_flags(p, PretrainOptions)
    p.set_defaults(
        resolve=lambda a: from_args(PretrainOptions, a), run=_pretrain, out_dir=lambda a: a.out
    )


def _pretrain(opts: Any) -> int:
    import json

    from trustpot.pretrain import run_pretrain

    card = run_pretrain(opts)
    print(json.dumps(card["held_out"]["overall"], indent=1))
    return 0


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line naming the command and the flag."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from trustpot import __version__

    parser = Parser(
        prog="trustpot",
        description="Machine-learned interatomic potentials that say how far to trust them.",
    )
    parser.add_argument("--version", action="version", version=f"trustpot {__version__}")
    sub: argparse._SubParsersAction[Any] = parser.add_subparsers(dest="command", required=True)
    from trustpot.cli.bench import add_bench_commands
    from trustpot.cli.data import add_data_commands
    from trustpot.cli.learn import add_learn_command
    from trustpot.cli.pretrained import add_pretrained_commands
    from trustpot.cli.scales import add_scales_commands
    from trustpot.cli.uq import add_uq_commands

    commands = [_add_quickstart, _add_train, _add_finetune, _add_eval, _add_md, add_uq_commands]
    commands += [_add_config]
    commands += [add_bench_commands, add_scales_commands, add_data_commands]
    commands += [add_pretrained_commands, _add_pretrain, add_learn_command]
    for add in commands:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args.resolve(args)))
    except TrustpotError as err:
        _write_error_log(args)
        print(f"trustpot: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "trustpot: interrupted; finished epochs are in last.ckpt (use --resume)",
            file=sys.stderr,
        )
        return 130


def _write_error_log(args: argparse.Namespace) -> None:
    try:
        folder = Path(args.out_dir(args))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.log").write_text(traceback.format_exc())
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
