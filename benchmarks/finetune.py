"""Safe fine-tuning (seed 002): scratch, full, LLRD, frozen, replay and MFT on two tasks.

Every row is one ``trustpot finetune`` run (:func:`trustpot.finetune.run_finetune`, the one
fine-tuning loop), so each writes its own ``report.json`` (downstream error, forgetting,
representation drift per layer); this script trains them under the same budget, evaluates the
downstream error in and out of domain and tabulates.

Tasks:

- ``molecules``: property prediction from ``trustpot-mol`` (PaiNN pretrained on GFN2-xTB
  energies and forces of 219 molecules). Frames are sampled and labelled by the xTB engine
  (:func:`trustpot.engines.corpus.generate_corpus`, 300 K Langevin MD) with the HOMO-LUMO gap
  (eV, per structure, intensive) and the dipole (e·Å, per-structure vector). In domain: small
  molecules (3-6 heavy atoms), split by molecule into fine-tuning and test molecules; out of
  domain: larger molecules (10-20 heavy atoms) that the fine-tuning never sees. Replay and
  forgetting frames: two disjoint halves of the held-out pretraining molecules (the
  ``test_molecules`` of trustpot-mol's card, never pretrained on); the replay and MFT rows
  train on the first half, forgetting (force error against the real xTB labels) is measured on
  the second, which no row trains on.
- ``materials``: CHGNet (``--foundation sevennet-0`` for SevenNet-0), pretrained on PBE(+U)
  MPtrj, fine-tuned to PBE-D3(BJ) silica zeolites (``../shared/data/sio2_zeolites``): in
  domain the 8 training topologies, out of domain the held-out PTY and UOE. Forgetting:
  forces against the untouched model's own predictions (pseudo-labels) on NaCl-in-water frames
  of ``revPBE0-D3_gen1b.xyz`` (``../shared/data/nacl_water``), a system the fine-tuning never
  sees; the replay frames come from another file (``gen1a``), so no row trains on them.

Rows (the decisions, written down):

- ``scratch``: the same architecture with freshly initialised weights (every submodule's
  ``reset_parameters``, seeded), trained by the same loop at the scratch learning rate;
- ``full``: every layer group at the learning rate;
- ``llrd``: layer-wise learning-rate decay (0.7 per group from the head down);
- ``freeze``: every group but the head (and the new property head) frozen;
- ``replay``: full fine-tuning plus the pretraining force-field objective on the replay frames
  (held-out pretraining-domain frames; real xTB labels for molecules, pseudo-labels of the
  untouched model for materials), weight 1 (``--strategy mft --replay FRAMES``);
- ``mft``: the seed's multi-task fine-tuning: the downstream objective and the pretraining
  force-field objective on the downstream structures themselves as well as on the replay
  frames (``--strategy mft`` with the fine-tuning frames added to the replay set: for the
  molecules their real xTB energies and forces, the pretraining level of theory; for the
  materials the untouched model's pseudo-labels, since the downstream labels are another level
  of theory).

Columns: in-domain and out-of-domain error (property MAE, or force MAE in eV/Å), OOD/ID,
forgetting (rise of the pretraining-task force MAE on the forgetting frames, eV/Å), mean W1
over layers and the last layer's Davies-Bouldin index by element before -> after (from each
run's ``report.json``), wall-clock seconds. The seed's claims are tested at the end: does full
fine-tuning collapse (Davies-Bouldin and W1 up, OOD worse than scratch)? Does MFT keep its OOD
error within 1.2x of its ID error while matching full fine-tuning in domain (within 10%)?

Every step is a :func:`trustpot.train.reuse.run_step` (reused on a rerun, resumed after a kill).

Quick mode is a smoke test of the script (CI): a few frames per set, 0.7 s per fine-tuning run,
no t-SNE maps, and the NaCl-water frames cut to 20-30 atom clusters around an ion.

    python benchmarks/finetune.py --quick --out /tmp/finetune-quick    # about 30 s, CI
    python benchmarks/finetune.py --out benchmarks/results/finetune      # full (about an hour)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.train.reuse import timed_step

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ZEOLITES = SHARED / "sio2_zeolites"
NACL = SHARED / "nacl_water" / "revPBE0-D3_gen1a.xyz"
#: forgetting frames of the materials task: another active-learning generation (other structures)
NACL_FORGETTING = SHARED / "nacl_water" / "revPBE0-D3_gen1b.xyz"
ROWS = ("scratch", "full", "llrd", "freeze", "replay", "mft")
TASKS = ("molecules", "materials")
FOUNDATIONS = ("chgnet", "sevennet-0")
#: (target key in the frames, level, kind, reduction, unit) of the molecular properties
PROPERTIES = {
    "gap": ("homo_lumo_gap", "structure", "scalar", "mean", "eV"),
    "dipole": ("xtb_dipole", "structure", "vector", "sum", "e*A"),
}
#: peak learning rates: a pretrained network is fine-tuned 10x below its new head
LR = {"molecules": 1e-3, "materials": 1e-4, "scratch": 1e-3, "freeze": 1e-3}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Mode:
    """Sizes and budgets of one mode (``minutes`` per fine-tuning run)."""

    minutes: float
    id_molecules: int  # small molecules (fine-tuning + in-domain test)
    test_molecules: int  # of which held out for the in-domain test
    ood_molecules: int
    frames: int  # per molecule (one 300 K trajectory)
    replay_molecules: int
    n_train: int  # zeolite frames
    n_test: int
    n_ood: int  # per held-out topology
    n_replay: int  # NaCl-water frames
    md_steps: tuple[int, int]  # xTB equilibration and interval
    properties: tuple[str, ...]  # molecular targets (keys of PROPERTIES)
    maps: bool = True  # the t-SNE maps of each run's report (seconds per run)
    cluster: float = 0.0  # > 0: NaCl-water frames cut to the cluster within this radius (Å)


MODES = {
    "quick": Mode(0.012, 5, 2, 2, 2, 1, 6, 2, 1, 1, (10, 5), ("gap",), maps=False, cluster=4.0),
    "full": Mode(3.0, 48, 12, 16, 3, 12, 240, 60, 60, 16, (60, 20), ("gap", "dipole")),
}


@dataclass(frozen=True)
class Settings:
    """Resolved command line."""

    out: Path
    mode_name: str
    mode: Mode
    tasks: tuple[str, ...]
    foundation: str
    minutes: float
    seed: int
    threads: int


# -- data -------------------------------------------------------------------------------------
def heavy_atoms(smiles: str) -> int:
    """Heavy atoms of a SMILES (RDKit)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    return int(mol.GetNumHeavyAtoms())


def molecule_sets(mode: Mode, seed: int) -> dict[str, list[str]]:
    """SMILES of the fine-tuning, in-domain test, out-of-domain, replay and forgetting molecules.

    Replay and forgetting molecules are disjoint halves of trustpot-mol's held-out test
    molecules (never pretrained on; only the replay half is ever trained on); the others
    come from the rest of the corpus: 3-6 heavy atoms in domain, 10-20 out of domain.
    """
    from trustpot.engines.corpus import CORPUS
    from trustpot.models.pretrained.trustpot_mol import card

    held_out = list(card()["data"]["test_molecules"])
    rest = [s for s in CORPUS if s not in set(held_out)]
    rng = np.random.default_rng(seed)
    small = [s for s in rest if 3 <= heavy_atoms(s) <= 6]
    large = [s for s in rest if 10 <= heavy_atoms(s) <= 20]
    small = [small[i] for i in rng.permutation(len(small))[: mode.id_molecules]]
    large = [large[i] for i in rng.permutation(len(large))[: mode.ood_molecules]]
    order = rng.permutation(len(held_out))
    replay = [held_out[i] for i in order[: mode.replay_molecules]]
    # held-out pretraining molecules that no row trains on, replay included (forgetting)
    forgetting = [held_out[i] for i in order[mode.replay_molecules :][: mode.replay_molecules]]
    n_test = mode.test_molecules
    return {"train": small[n_test:], "test_id": small[:n_test], "test_ood": large,
            "replay": replay, "forgetting": forgetting}  # fmt: skip


def prepare_molecules(s: Settings, log: Log) -> dict[str, str]:
    """xTB frames of each molecule set, one extended XYZ file per set."""
    from trustpot.engines.corpus import CorpusOptions, generate_corpus

    sets = molecule_sets(s.mode, s.seed)
    files: dict[str, str] = {}
    for name, smiles in sets.items():
        opts = CorpusOptions(
            molecules=tuple(smiles), temperatures=(300.0,), frames=s.mode.frames, seed=s.seed,
            equilibration=s.mode.md_steps[0], interval=s.mode.md_steps[1],
        )  # fmt: skip
        config = {"set": name, **dataclasses.asdict(opts)}

        def work(where: Path, resuming: bool, o: Any = opts) -> dict[str, Any]:
            generate_corpus(where / "frames.xyz", o, progress=False)
            return {"file": str(where / "frames.xyz")}

        log(f"molecules: labelling {name} ({len(smiles)} molecules) with xTB")
        files[name] = timed_step(s.out / "molecules" / "data" / name, config, work, log)["file"]
    return files


def ion_cluster(atoms: Any, radius: float) -> Any:
    """The ions and whole water molecules whose heavy atom lies within ``radius`` Å of the
    frame's first ion, unwrapped around it, without cell or labels (quick mode: a 20-30 atom
    stand-in for a 160-190 atom NaCl-water frame; the materials task uses only the untouched
    model's predictions on these frames, never their DFT labels)."""
    from ase import Atoms

    z = atoms.numbers
    centre = int(np.flatnonzero((z == 11) | (z == 17))[0])
    vectors = atoms.get_distances(centre, range(len(atoms)), mic=True, vector=True)
    pos = atoms.positions[centre] + vectors
    heavy = np.flatnonzero(z != 1)
    keep = np.zeros(len(z), dtype=bool)
    keep[heavy] = np.linalg.norm(vectors[heavy], axis=1) <= radius
    hydrogens = np.flatnonzero(z == 1)  # each goes with its nearest heavy atom
    near = np.linalg.norm(pos[hydrogens, None] - pos[None, heavy], axis=2).argmin(axis=1)
    keep[hydrogens] = keep[heavy[near]]
    return Atoms(numbers=z[keep], positions=pos[keep])


def prepare_materials(s: Settings, log: Log) -> dict[str, str]:
    """Zeolite frames (train/test_id from the training topologies, test_ood from PTY and UOE)
    and NaCl-water replay frames (cut to clusters in quick mode), one extended XYZ file per
    set."""
    from ase.io import write

    from trustpot.data.reader import read_atoms as read  # decompresses .gz in memory: fast

    m = s.mode
    config = {"n_train": m.n_train, "n_test": m.n_test, "n_ood": m.n_ood,
              "n_replay": m.n_replay, "seed": s.seed}  # fmt: skip
    if m.cluster:
        config["cluster"] = m.cluster

    def nacl_frames(path: Path, rng: np.random.Generator) -> list[Any]:
        nacl = read(path, ":")
        frames = [nacl[int(i)] for i in rng.permutation(len(nacl))[: m.n_replay]]
        return [ion_cluster(f, m.cluster) for f in frames] if m.cluster else frames

    def work(where: Path, resuming: bool) -> dict[str, Any]:
        rng = np.random.default_rng(s.seed)
        pool: list[Any] = []
        files = sorted(ZEOLITES.glob("train_topology_*.xyz.gz"))
        per = (m.n_train + m.n_test) // len(files) + 1
        for f in files:
            frames = read(f, "::10")
            pool.extend(frames[int(i)] for i in rng.permutation(len(frames))[:per])
        order = rng.permutation(len(pool))
        picked = [pool[int(i)] for i in order[: m.n_train + m.n_test]]
        sets = {"train": picked[: m.n_train], "test_id": picked[m.n_train :]}
        sets["test_ood"] = []
        for code in ("PTY", "UOE"):
            frames = read(ZEOLITES / f"test_topology_{code}.xyz.gz", "::10")
            sets["test_ood"] += [frames[int(i)] for i in rng.permutation(len(frames))[: m.n_ood]]
        sets["replay"] = nacl_frames(NACL, rng)
        out = {}
        for name, frames in sets.items():
            write(where / f"{name}.xyz", frames, format="extxyz")
            out[name] = str(where / f"{name}.xyz")
        return {"files": out}

    files = dict(timed_step(s.out / "materials" / "data", config, work, log)["files"])
    held = {"source": NACL_FORGETTING.name, "n": m.n_replay, "seed": s.seed}
    if m.cluster:
        held["cluster"] = m.cluster

    def forgetting(where: Path, resuming: bool) -> dict[str, Any]:
        frames = nacl_frames(NACL_FORGETTING, np.random.default_rng(s.seed))
        write(where / "forgetting.xyz", frames, format="extxyz")
        return {"file": str(where / "forgetting.xyz")}

    step = timed_step(s.out / "materials" / "data_forgetting", held, forgetting, log)
    files["forgetting"] = step["file"]
    return files


def mft_replay(files: Mapping[str, str], where: Path) -> str:
    """The MFT force-field frames: the fine-tuning frames and the replay frames in one file
    (labelled as ``--replay-labels`` says: their own xTB labels for the molecules, the untouched
    model's predictions for the materials, whose downstream labels are another level of
    theory)."""
    from ase.io import read, write

    frames = list(read(files["train"], ":")) + list(read(files["replay"], ":"))
    path = where / "mft_frames.xyz"
    write(path, frames, format="extxyz")
    return str(path)


# -- rows -------------------------------------------------------------------------------------
def scratch_checkpoint(base: str, where: Path, seed: int) -> str:
    """``base``'s architecture with fresh weights (every submodule with ``reset_parameters``
    reset, seeded), saved as a checkpoint the fine-tuning loop starts from."""
    import torch

    from trustpot.io.checkpoint import load_model, save_model

    model = load_model(base)  # a fresh object, re-initialised in place
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and module is not model:
            reset()
    path = where / "scratch_start.ckpt"
    save_model(model, path)
    return str(path)


def row_options(
    s: Settings, task: str, row: str, files: Mapping[str, str], where: Path, target: str | None
) -> Any:
    """The :class:`~trustpot.finetune.FinetuneOptions` of one row."""
    from trustpot.finetune import FinetuneOptions

    base = "trustpot-mol" if task == "molecules" else s.foundation
    kwargs: dict[str, Any] = {
        "base": base, "train": files["train"], "valid_fraction": 0.1, "test_ood":
        files["test_ood"], "replay": files["replay"], "epochs": 100000,
        "max_minutes": s.minutes, "seed": s.seed, "threads": s.threads,
        "replay_labels": "given" if task == "molecules" else "pseudo",
        "no_maps": not s.mode.maps,
    }  # fmt: skip
    if target is not None:
        key, level, kind, reduce, _ = PROPERTIES[target]
        kwargs.update(target=key, target_level=level, target_kind=kind)
        if kind == "scalar":
            kwargs["target_reduce"] = reduce
    kwargs["lr"] = LR.get(row, LR[task])
    if row == "scratch":
        kwargs.update(base=scratch_checkpoint(base, where, s.seed), strategy="full")
    elif row in ("full", "llrd", "freeze"):
        kwargs["strategy"] = row
    else:
        kwargs["strategy"] = "mft"
        if row == "mft":
            kwargs["replay"] = mft_replay(files, where)
    return FinetuneOptions(**kwargs)


def downstream_error(model: Any, frames: str, target: str | None) -> float:
    """MAE of ``model``'s downstream quantity on ``frames``: the property (its unit) or the
    forces (eV/Å), pooled over every component (:func:`trustpot.metrics.accuracy.pooled_mae`)."""
    from trustpot import keys as K
    from trustpot.calculator import Predictor
    from trustpot.data.splits import read_data
    from trustpot.metrics.accuracy import pooled_mae

    structures = read_data(frames)
    if target is None:
        preds = Predictor(model).predict_structures(structures)
        return pooled_mae(p[K.FORCES] - st.forces for p, st in zip(preds, structures))
    key = PROPERTIES[target][0]
    out_key = K.property_key(key)  # the fine-tuned model's output of the property
    preds = Predictor(model).predict_structures(structures, {out_key})
    refs = [np.asarray(st.info[key], dtype=float) for st in structures]
    return pooled_mae(
        np.asarray(p[out_key], dtype=float).reshape(r.shape) - r for p, r in zip(preds, refs)
    )


def run_row(
    s: Settings, task: str, row: str, files: Mapping[str, str], target: str | None, log: Log
) -> dict[str, Any]:
    """Fine-tune one row (reused when done) and measure it."""
    from trustpot.finetune import run_finetune
    from trustpot.io.checkpoint import load_model

    label = f"{task}/{target or 'forces'}/{row}"
    folder = s.out / task / (target or "forces") / row
    folder.mkdir(parents=True, exist_ok=True)
    opts = row_options(s, task, row, files, folder, target)
    config = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("threads", "no_maps")}
    if row == "scratch":
        config["base"] = "scratch"  # the path is derived; the step is the same
    if row == "mft":
        config["replay"] = "train+replay"

    def work(where: Path, resuming: bool) -> dict[str, Any]:
        run = where / "run"
        run_finetune(opts, run, resume=resuming and (run / "last.ckpt").is_file())
        model = load_model(run / "best.ckpt")  # loaded once for both test sets
        return {
            "id": downstream_error(model, files["test_id"], target),
            "ood": downstream_error(model, files["test_ood"], target),
        }

    log(f"{label}: fine-tuning ({s.minutes} min)")
    result = timed_step(folder, config, work, log)
    log(f"{label}: ID {result['id']:.4g}, OOD {result['ood']:.4g}, {result['seconds']:.0f} s")
    best = str(folder / "run" / "best.ckpt")
    measured = timed_step(
        folder / "forgetting",
        {"frames": Path(files["forgetting"]).name, "row": row},
        lambda where, resuming: against_pretrained(
            s, task, best, files["forgetting"], row == "scratch"
        ),
        log,
    )
    report = {k: v for k, v in measured.items() if k not in ("seconds", "reused")}
    result = {k: v for k, v in result.items() if k not in ("report", "best", "reused")}
    return {"task": task, "target": target or "forces", "row": row, **result, "report": report}


def against_pretrained(
    s: Settings, task: str, best: str, replay: str, scratch: bool
) -> dict[str, Any]:
    """Forgetting and drift of the fine-tuned model ``best`` against the untouched pretrained
    model, on the same held-out frames for every row, frames that no row trained on (replay
    included; :func:`trustpot.finetune_report.finetune_report`; the run's own ``report.json``
    uses its ``--replay`` frames, which the replay and MFT rows train on). Forgetting is the
    rise of the pretraining-task force MAE (real xTB
    labels for the molecules, the pretrained model's predictions for the materials). A model
    trained from scratch has no embedding space in common with the pretrained one: its W1 and
    CKA are not defined (NaN); the Davies-Bouldin indices still compare the two."""
    from trustpot.data.splits import read_data
    from trustpot.finetune_report import finetune_report, forgetting_rise
    from trustpot.io.checkpoint import load_model

    base = "trustpot-mol" if task == "molecules" else s.foundation
    frames = read_data(replay, require=("energy", "forces") if task == "molecules" else ())
    report = finetune_report(
        load_model(base), load_model(best), frames, Path(replay).name,
        given_labels=task == "molecules",
    )  # fmt: skip
    drift = list(report["drift"])
    last = drift[-1]
    nan = float("nan")
    return {
        "forgetting": forgetting_rise(report["forgetting"]),
        "w1_mean": nan if scratch else float(np.mean([d["w1"] for d in drift])),
        "w1_last": nan if scratch else float(last["w1"]),
        "cka_last": nan if scratch else float(last["cka"]),
        "db_before": float(last["davies_bouldin_before"]),
        "db_after": float(last["davies_bouldin_after"]),
        "verdict": str(report["verdict"]),
    }


# -- claims and output ------------------------------------------------------------------------
def claims(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The seed's two claims per (task, target), answered from the rows."""
    out = []
    groups = sorted({(r["task"], r["target"]) for r in rows})
    for task, target in groups:
        by = {r["row"]: r for r in rows if (r["task"], r["target"]) == (task, target)}
        full, mft, scratch = by["full"], by["mft"], by["scratch"]
        fr = full["report"]
        collapse = {
            "davies_bouldin_up": fr["db_after"] > fr["db_before"],
            "w1_above_mft": fr["w1_mean"] > mft["report"]["w1_mean"],
            "ood_worse_than_scratch": full["ood"] > scratch["ood"],
        }
        ratio = mft["ood"] / mft["id"] if mft["id"] > 0 else math.inf
        out.append({
            "task": task, "target": target,
            "full_collapses": collapse, "full_collapses_answer": "yes" if all(collapse.values())
            else "no" if not any(collapse.values()) else "partly",
            "mft_ood_over_id": ratio, "mft_ood_within_1.2x": ratio <= 1.2,
            "mft_id_over_full_id": mft["id"] / full["id"] if full["id"] > 0 else math.inf,
            "mft_matches_full_in_domain": mft["id"] <= 1.1 * full["id"],
        })  # fmt: skip
    return out


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3g}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table over every row."""
    lines = [
        "| task | target (unit) | row | ID error | OOD error | OOD/ID | forgetting eV/Å | "
        "W1 (mean over layers) | Davies-Bouldin last layer, before -> after | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unit = PROPERTIES[r["target"]][4] if r["target"] in PROPERTIES else "eV/Å"
        rep = r["report"]
        lines.append(
            f"| {r['task']} | {r['target']} ({unit}) | {r['row']} | {_fmt(r['id'])} | "
            f"{_fmt(r['ood'])} | {_fmt(r['ood'] / r['id'] if r['id'] else math.inf)} | "
            f"{_fmt(rep['forgetting'])} | {_fmt(rep['w1_mean'])} | {_fmt(rep['db_before'])} -> "
            f"{_fmt(rep['db_after'])} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def report_md(s: Settings, rows: list[dict[str, Any]], answers: list[dict[str, Any]],
              header: Mapping[str, Any]) -> str:  # fmt: skip
    """``finetune.md``."""
    m = s.mode
    lines = [
        f"# Safe fine-tuning benchmark ({s.mode_name} mode)\n",
        f"Budget per fine-tuning run: {s.minutes} min; {s.threads} thread(s); seed {s.seed}; "
        f"git {header['git']}; wall {header['wall_s']:.0f} s. Molecules: {m.id_molecules} "
        f"small molecules ({m.test_molecules} held out for the in-domain test), "
        f"{m.ood_molecules} large ones out of domain, {m.replay_molecules} held-out "
        f"pretraining molecules for replay/forgetting, {m.frames} frames each (xTB, 300 K). "
        f"Materials: {s.foundation}, {m.n_train} zeolite frames, {m.n_test} in-domain test, "
        f"{m.n_ood} per held-out topology, {m.n_replay} NaCl-water frames (pseudo-labelled).\n",
    ]
    if s.mode_name == "quick":
        lines.append("**Quick mode: a smoke test of the script, not results.**\n")
    lines.append(table(rows) + "\n")
    lines.append("## The seed's claims\n")
    for a in answers:
        c = a["full_collapses"]
        lines.append(
            f"- {a['task']} / {a['target']}: full fine-tuning collapses? "
            f"**{a['full_collapses_answer']}** (Davies-Bouldin up: {c['davies_bouldin_up']}, "
            f"W1 above MFT's: {c['w1_above_mft']}, OOD worse than scratch: "
            f"{c['ood_worse_than_scratch']}). MFT OOD/ID {_fmt(a['mft_ood_over_id'])} "
            f"(within 1.2x: **{a['mft_ood_within_1.2x']}**), MFT ID / full ID "
            f"{_fmt(a['mft_id_over_full_id'])} (matches full in domain: "
            f"**{a['mft_matches_full_in_domain']}**)."
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> Settings:
    """Command-line options; an option that cannot be used is an error."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder (steps reused on a rerun)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (CI smoke test)")
    p.add_argument("--task", choices=(*TASKS, "both"), default="both")
    p.add_argument("--foundation", choices=FOUNDATIONS, default="chgnet",
                   help="materials task: the pretrained model fine-tuned")  # fmt: skip
    p.add_argument("--minutes", type=float, help="budget per fine-tuning run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    name = "quick" if args.quick else "full"
    mode = MODES[name]
    minutes = mode.minutes if args.minutes is None else args.minutes
    if minutes <= 0:
        p.error(f"--minutes must be positive, got {minutes}")
    if args.task == "molecules" and args.foundation != "chgnet":
        p.error("--foundation is an option of the materials task, not of --task molecules")
    tasks = TASKS if args.task == "both" else (args.task,)
    return Settings(Path(args.out), name, mode, tasks, args.foundation, minutes, args.seed,
                    args.threads)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import importlib.util

    import torch

    s = parse(argv)
    s.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    log_file = (s.out / "log.txt").open("a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for task in s.tasks:
        if task == "molecules" and importlib.util.find_spec("tblite") is None:
            skipped[task] = "the xtb extra (tblite) is not installed"
        elif task == "materials" and not ZEOLITES.is_dir():
            skipped[task] = f"{ZEOLITES} is absent"
        if task in skipped:
            log(f"{task}: skipped: {skipped[task]}")
            continue
        files = prepare_molecules(s, log) if task == "molecules" else prepare_materials(s, log)
        targets: tuple[str | None, ...] = s.mode.properties if task == "molecules" else (None,)
        for target in targets:
            for row in ROWS:
                rows.append(run_row(s, task, row, files, target, log))
    answers = claims(rows)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    header = {"git": git, "wall_s": time.perf_counter() - t0, "python": sys.version.split()[0],
              "machine": platform.machine(), "mode": s.mode_name, "minutes": s.minutes,
              "threads": s.threads, "seed": s.seed, "foundation": s.foundation}  # fmt: skip
    result = {"header": header, "rows": rows, "claims": answers, "skipped": skipped}
    (s.out / "finetune.json").write_text(json.dumps(result, indent=1))
    (s.out / "finetune.md").write_text(report_md(s, rows, answers, header))
    log(f"wrote {s.out / 'finetune.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
