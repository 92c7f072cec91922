"""``trustpot data molecules | label | isolated-atoms | compositional | nacl-water | nbody``.

Reference-engine data.

Each command is a thin layer over a function of :mod:`trustpot.engines`. Output is extended XYZ,
appended as frames finish; rerunning the same command resumes. Exit code 0 when every frame is
written, 1 when some failed (listed in ``OUT.failed.jsonl``), 2 for bad options or input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _out_dir(args: argparse.Namespace) -> str:
    return str(Path(args.out).parent)


def _workers(args: argparse.Namespace) -> Any:
    """``--workers`` and ``--dask`` as :data:`trustpot.parallel.Workers`."""
    from trustpot.parallel import workers_from_flags

    given = args.workers is not None
    return workers_from_flags(args.workers if given else 1, args.dask, given)


def _report(summary: Any) -> int:
    line = (
        f"{summary.out}: {summary.resumed + summary.written}/{summary.total} frames "
        f"({summary.resumed} resumed, {summary.written} new, {summary.failed} failed) in "
        f"{summary.seconds:.1f} s"
    )
    if summary.written:
        line += f", {summary.frames_per_minute:.0f} frames/min"
    if summary.torn_bytes:
        line += f"; cut a torn last frame ({summary.torn_bytes} bytes)"
    print(line)
    if summary.failed:
        print(
            f"trustpot: {summary.failed} frame(s) failed; reasons in {summary.failed_path}; "
            "rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _molecules(args: argparse.Namespace) -> dict[str, Any]:
    from trustpot.engines.xtb import MDOptions

    md = MDOptions(
        timestep=args.timestep,
        friction=args.friction,
        equilibration=args.equilibration,
        interval=args.interval,
        chunk=args.chunk,
    )
    return dict(
        smiles=args.smiles,
        temperatures=args.temperatures,
        frames=args.frames,
        out=args.out,
        seed=args.seed,
        workers=_workers(args),
        method=args.method,
        md=md,
        progress=not args.quiet,
    )


def _label(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        source=args.file,
        out=args.out,
        method=args.method,
        workers=_workers(args),
        progress=not args.quiet,
    )


def _isolated(args: argparse.Namespace) -> dict[str, Any]:
    from ase.data import atomic_numbers

    from trustpot.errors import ConfigError

    unknown = [e for e in args.elements if atomic_numbers.get(e, 0) == 0]
    if unknown:
        raise ConfigError(f"--elements: unknown element symbol(s) {unknown}")
    return dict(
        numbers=[atomic_numbers[e] for e in args.elements],
        out=args.out,
        method=args.method,
        workers=_workers(args),
        progress=not args.quiet,
    )


def _compositional(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        task=args.task,
        out_dir=args.out,
        frames_per_molecule=args.frames,
        temperatures=args.temperatures,
        seed=args.seed,
        workers=args.workers,
        quick=args.quick,
        progress=not args.quiet,
    )


def _run_compositional(call: dict[str, Any]) -> int:
    from trustpot.engines.compositional import build_task_data

    data = build_task_data(**call)
    print(
        f"{data.data}: frames {data.sizes}, molecules {data.molecules}, {data.failed} failed, "
        f"{data.seconds:.1f} s; split manifest {data.manifest}"
    )
    if data.failed:
        print(
            f"trustpot: {data.failed} frame(s) failed; reasons in {data.raw}.failed.jsonl; "
            "rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def _nacl_water(args: argparse.Namespace) -> dict[str, Any]:
    from trustpot.engines.nacl_water import BoxOptions

    box = BoxOptions(
        grid=args.grid,
        cutoff=args.cutoff,
        timestep=args.timestep,
        friction=args.friction,
        equilibration=args.equilibration,
        interval=args.interval,
        chunk=args.chunk,
        contact_fraction=args.contact_fraction,
    )
    return dict(
        pairs=args.pairs,
        frames=args.frames,
        out=args.out,
        temperatures=args.temperatures,
        seed=args.seed,
        workers=_workers(args),
        box=box,
        progress=not args.quiet,
    )


def _nbody(args: argparse.Namespace) -> dict[str, Any]:
    from trustpot.engines.nbody import MCOptions

    mc = MCOptions(
        box=args.box,
        step=args.step,
        r0=args.r0,
        equilibration=args.equilibration,
        interval=args.interval,
        chunk=args.chunk,
    )
    return dict(
        particles=args.particles,
        frames=args.frames,
        out=args.out,
        temperatures=args.temperatures,
        seed=args.seed,
        workers=_workers(args),
        mc=mc,
        progress=not args.quiet,
    )


def _run(module: str, function: str) -> Callable[[dict[str, Any]], int]:
    """Run ``module.function(**call)`` and report its summary."""

    def run(call: dict[str, Any]) -> int:
        import importlib

        return _report(getattr(importlib.import_module(module), function)(**call))

    return run


def _common(p: argparse.ArgumentParser, frames: bool = True) -> None:
    if frames:
        p.add_argument("--frames", type=int, required=True, help="frames per (system, temperature)")
        p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--out", required=True, help="extended XYZ output; rerun to resume")
    add_workers_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_workers_flags(p: argparse.ArgumentParser, what: str = "worker processes") -> None:
    """``--workers N`` and ``--dask [local|ADDRESS]`` (resolve with :func:`_workers`)."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"{what} (default 1; 0: in this process); with --dask local: LocalCluster workers",
    )
    p.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="run the tasks on Dask distributed: 'local' (a LocalCluster of --workers "
        "processes) or a running scheduler's address (tcp://host:8786; its workers must "
        "share this file system). Extra: dask",
    )


def _sampling(p: argparse.ArgumentParser, eq: int, interval: int, chunk: int, unit: str) -> None:
    p.add_argument(
        "--equilibration", type=int, default=eq, help=f"{unit} before the first frame ({eq})"
    )
    p.add_argument(
        "--interval", type=int, default=interval, help=f"{unit} between frames ({interval})"
    )
    p.add_argument(
        "--chunk", type=int, default=chunk, help=f"frames per independent trajectory ({chunk})"
    )


def add_engine_commands(data_sub: argparse._SubParsersAction[Any]) -> None:
    """Register the engine subcommands under ``trustpot data``."""
    p = data_sub.add_parser(
        "molecules",
        help="sample molecules from SMILES by Langevin MD with GFN2-xTB (extra: xtb)",
        description="RDKit conformers, Langevin MD with tblite forces, labelled frames.",
    )
    p.add_argument("--smiles", nargs="+", required=True, help="SMILES strings")
    p.add_argument("--temperatures", nargs="+", type=float, default=[300.0], help="K (default 300)")
    p.add_argument("--method", default="GFN2-xTB", help="xTB method (default GFN2-xTB)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--friction", type=float, default=0.01, help="1/fs (default 0.01)")
    _sampling(p, 400, 40, 10, "MD steps")
    _common(p)
    p.set_defaults(
        resolve=_molecules, run=_run("trustpot.engines.xtb", "generate_molecules"), out_dir=_out_dir
    )

    p = data_sub.add_parser(
        "label",
        help="label structures of any ASE-readable file with xTB (extra: xtb)",
        description="Energies and forces for every frame; charge/uhf/multiplicity from "
        "atoms.info, else neutral closed shell.",
    )
    p.add_argument("file", help="structures (any format ASE reads)")
    p.add_argument("--method", default="GFN2-xTB", help="xTB method (default GFN2-xTB)")
    _common(p, frames=False)
    p.set_defaults(resolve=_label, run=_run("trustpot.engines.xtb", "label_file"), out_dir=_out_dir)

    p = data_sub.add_parser(
        "isolated-atoms",
        help="xTB energies of free atoms in their ground-state spin, for --isolated-atoms",
        description="One single-atom frame per element, labelled with xTB in the free atom's "
        "ground-state spin (Hund's rules; main-group elements): the reference energies "
        "'trustpot train --isolated-atoms FILE' reads.",
    )
    p.add_argument("--elements", nargs="+", required=True, help="element symbols, e.g. H C O")
    p.add_argument("--method", default="GFN2-xTB", help="xTB method (default GFN2-xTB)")
    _common(p, frames=False)
    p.set_defaults(
        resolve=_isolated, run=_run("trustpot.engines.xtb", "isolated_atoms"), out_dir=_out_dir
    )

    from trustpot.engines.compositional import TASKS

    p = data_sub.add_parser(
        "compositional",
        help="fragment-annotated xTB data of a compositional task with its split (extra: xtb)",
        description="Molecules of one compositional task (duplication, combination, size, holdout) "
        "sampled by Langevin MD with GFN2-xTB labels; writes OUT/data.xyz (fragment "
        "annotations in atoms.info and a per-atom fragment_label) and OUT/split.json "
        "(train, test_id, test_ood). Rerun to resume.",
    )
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, default=20, help="frames per molecule (default 20)")
    p.add_argument("--temperatures", nargs="+", type=float, default=[300.0], help="K (default 300)")
    p.add_argument("--quick", action="store_true", help="small molecules and short MD")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and split (default 0)")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes (default 1; 0: in this process)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(resolve=_compositional, run=_run_compositional, out_dir=lambda a: a.out)

    p = data_sub.add_parser(
        "nacl-water",
        help="NaCl in periodic TIP3P water with OpenMM (extra: openmm)",
        description="Flexible TIP3P + Joung-Cheatham ions, PME; NVT Langevin sampling.",
    )
    p.add_argument("--pairs", nargs="+", type=int, required=True, help="ion pairs, 1 to 8")
    p.add_argument("--temperatures", nargs="+", type=float, default=[300.0], help="K (default 300)")
    p.add_argument("--grid", type=int, default=5, help="lattice sites per box edge (default 5)")
    p.add_argument("--cutoff", type=float, default=0.7, help="nm (default 0.7)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--friction", type=float, default=1.0, help="1/ps (default 1)")
    p.add_argument(
        "--contact-fraction",
        type=float,
        default=0.0,
        help="share of trajectories whose first ion pair starts in contact, on neighbouring "
        "sites (more close-contact frames; default 0)",
    )
    _sampling(p, 2000, 200, 20, "MD steps")
    _common(p)
    p.set_defaults(
        resolve=_nacl_water,
        run=_run("trustpot.engines.nacl_water", "generate_nacl_water"),
        out_dir=_out_dir,
    )

    p = data_sub.add_parser(
        "nbody",
        help="charged N-body system (+/-1 e, Coulomb + r^-9 repulsion), exact labels",
        description="Metropolis sampling of point charges; Na stands for +1 e, Cl for -1 e.",
    )
    p.add_argument("--particles", nargs="+", type=int, required=True, help="particle counts")
    p.add_argument(
        "--temperatures", nargs="+", type=float, default=[1000.0], help="K (default 1000)"
    )
    p.add_argument("--box", type=float, default=10.0, help="Å, sampling cube edge (default 10)")
    p.add_argument("--step", type=float, default=0.4, help="Å, trial move half-width (0.4)")
    p.add_argument("--r0", type=float, default=2.8, help="Å, +/- pair minimum (default 2.8)")
    _sampling(p, 200, 20, 20, "MC sweeps")
    _common(p)
    p.set_defaults(
        resolve=_nbody, run=_run("trustpot.engines.nbody", "generate_nbody"), out_dir=_out_dir
    )
