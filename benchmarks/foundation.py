"""Foundation backbones against PaiNN from scratch: reliability on out-of-domain zeolites.

Data: pure-silica zeolites (``../shared/data/sio2_zeolites``, PBE-D3, periodic). Frames of the
8 training topologies are split (seeded) into train / calibration / in-domain test; the
out-of-domain test is the two held-out topologies PTY and UOE (pooled).

Backbones, each trained on the same training frames with the same wall-clock budget per model
(``--minutes``):

- ``foundation``: a pretrained model (``chgnet`` by default, ``--foundation sevennet-0``)
  fine-tuned with :func:`trustpot.finetune.run_finetune`, strategy ``full``;
- ``painn``: PaiNN trained from scratch with :func:`trustpot.train.run.run_training`.

Reliability methods per backbone (a row each; a method that does not apply is a row saying
why): PROBE (:func:`trustpot.uq.probe.fit_probe` on the calibration frames, which no model
trained on), a deep ensemble of ``--members`` models (seeds ``seed, seed + 1, ...``;
:class:`~trustpot.uq.ensemble.DeepEnsemble`, recalibrated on the calibration frames by
:func:`trustpot.uq.fit.finish` as ``trustpot uq fit`` does), learned perturbations
(:func:`trustpot.uq.perturb.fit_perturbation` through each model's modulation hook, so also
P-CHGNet / P-SevenNet), MC dropout (PaiNN trained with head dropout)
and zero-shot PROBE (the untouched pretrained model, PROBE fitted on the calibration frames).

Metrics are those of ``benchmarks/uq.py`` (:func:`trustpot.uq.collect.collect`,
:func:`trustpot.uq.report.uq_metrics`, :func:`~trustpot.uq.report.headline`). Every step
(data, each model, each wrapper, each evaluation) is a :func:`trustpot.train.reuse.run_step`:
finished steps are reused on a rerun, an interrupted training resumes. Outputs:
``OUT/foundation.json`` and ``OUT/foundation.md``.

    python benchmarks/foundation.py --quick --out /tmp/foundation-quick      # < 60 s, CI
    python benchmarks/foundation.py --out benchmarks/results/foundation      # full (hours)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trustpot.train.reuse import timed_step

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ZEOLITES = SHARED / "sio2_zeolites"
BACKBONES = ("foundation", "painn")
METHODS = ("probe", "ensemble", "perturb", "mc-dropout", "zero-shot-probe")
TESTS = ("test_id", "test_ood")
FOUNDATIONS = ("chgnet", "sevennet-0")
FINETUNE_LR = 1e-4  # full fine-tuning of a pretrained network: 10x below the head default
#: learning rate of the perturbation layers on the foundation model: PaiNN's 1e-2 diverged on
#: fine-tuned CHGNet (train loss 732 after one epoch on 50 EDI training frames; 1e-3: 1.26)
FOUNDATION_PERTURB_LR = 1e-3
MC_DROPOUT = 0.1  # head dropout of the MC-dropout PaiNN (as benchmarks/uq.py)
MC_SAMPLES = 16
NOT_APPLICABLE = {
    ("foundation", "mc-dropout"): "n/a: the pretrained adapters have no head dropout to "
    "sample (MC dropout needs a model trained with head dropout)",
    ("painn", "zero-shot-probe"): "n/a: there is no pretrained PaiNN (trained from scratch)",
}

Log = Callable[[str], None]


def _load_uq_benchmark() -> Any:
    """``benchmarks/uq.py`` as a module (its data helpers and constants are reused)."""
    spec = importlib.util.spec_from_file_location(
        "trustpot_uq_benchmark", ROOT / "benchmarks" / "uq.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


UQB = _load_uq_benchmark()


@dataclass
class Mode:
    """Sizes and budgets of one mode.

    ``n_ood`` is per out-of-domain topology; ``read_stop`` limits the MD frames parsed per file
    (``None``: whole files); every ``stride``-th frame is a candidate.
    """

    minutes: float  # per trained model (fine-tune or from scratch)
    epochs: int  # cap on epochs per model (the budget usually stops first)
    n_train: int
    n_cal: int
    n_test: int
    n_ood: int
    members: int
    probe_epochs: int
    stride: int = 10
    read_stop: int | None = None
    hypers: dict[str, Any] = field(default_factory=dict)
    maps: bool = True  # t-SNE maps in the fine-tuning reports (seconds per member)
    perturb_samples: tuple[int, int] = (4, 8)  # perturbations per structure: training, predicting


MODES = {
    # every model is stopped by the wall-clock budget (the epoch caps are never reached);
    # 10 calibration frames: fit_probe's minimum (trustpot.uq.probe.MIN_STRUCTURES)
    "quick": Mode(0.025, 100000, 12, 10, 4, 4, 2, 20, 10, 300, {"n_features": 16, "n_layers": 2},
                  maps=False, perturb_samples=(2, 3)),
    "full": Mode(5.0, 100000, 300, 100, 100, 100, 3, 200),
}  # fmt: skip


# -- steps ----------------------------------------------------------------------------------
def prepare(mode: Mode, out: Path, seed: int, log: Log) -> dict[str, Any]:
    """Write ``out/data.xyz`` and ``out/split.json``: ``train``, ``calibration``, ``test_id``
    (training topologies) and ``test_ood`` (PTY and UOE, ``n_ood`` frames each)."""
    from trustpot.data.reader import read_atoms
    from trustpot.data.splits import write_manifest

    sizes = {k: getattr(mode, k) for k in ("n_train", "n_cal", "n_test", "n_ood", "stride")}
    config = {"seed": seed, "read_stop": mode.read_stop, **sizes}
    index = f":{mode.read_stop or ''}:{mode.stride}"

    def work(folder: Path, resuming: bool) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        n_id = mode.n_train + mode.n_cal + mode.n_test
        train_files = sorted(ZEOLITES.glob("train_topology_*.xyz.gz"))
        per_topo = math.ceil(n_id / len(train_files))
        pool: list[Any] = []
        for f in train_files:
            topo = read_atoms(f, index)
            pool.extend(topo[i] for i in UQB._pick(len(topo), per_topo, rng))
        order = rng.permutation(len(pool))[:n_id]
        bounds = np.cumsum([0, mode.n_train, mode.n_cal, mode.n_test])
        frames: list[Any] = []
        subsets: dict[str, list[int]] = {}
        for name, lo, hi in zip(("train", "calibration", "test_id"), bounds[:-1], bounds[1:]):
            subsets[name] = list(range(len(frames), len(frames) + int(hi - lo)))
            frames.extend(pool[i] for i in order[lo:hi])
        ood: list[Any] = []
        for code in ("PTY", "UOE"):
            topo = read_atoms(ZEOLITES / f"test_topology_{code}.xyz.gz", index)
            ood.extend(topo[i] for i in UQB._pick(len(topo), mode.n_ood, rng))
        subsets["test_ood"] = list(range(len(frames), len(frames) + len(ood)))
        frames.extend(ood)
        UQB._write(frames, folder / "data.xyz")
        write_manifest(
            folder / "data.xyz", subsets, "benchmark", seed, config, folder / "split.json"
        )
        return {"subsets": {k: len(v) for k, v in subsets.items()}}

    result = timed_step(out / "data", config, work, log)
    log(f"data: {result['subsets']}")
    return result


# -- the benchmark ----------------------------------------------------------------------------
@dataclass
class Settings:
    """Command-line settings, resolved."""

    out: Path
    mode_name: str
    mode: Mode
    foundation: str
    minutes: float
    members: int
    seed: int
    threads: int


def _painn_config(s: Settings, spec: str, seed: int) -> Any:
    from trustpot.config import load_config

    return load_config(
        None,
        [f"model.hypers.{k}={v}" for k, v in s.mode.hypers.items()],
        {
            "data": {"train": f"{spec}:train", "valid_fraction": 0.1},
            "model": {"name": "painn"},
            "train": {
                "max_minutes": s.minutes,
                "epochs": s.mode.epochs,
                "seed": seed,
                "threads": s.threads,
            },
        },
    )


def _finetune_options(s: Settings, spec: str, seed: int) -> Any:
    from trustpot.finetune import FinetuneOptions

    return FinetuneOptions(
        base=s.foundation,
        train=f"{spec}:train",
        valid_fraction=0.1,
        strategy="full",
        lr=FINETUNE_LR,
        epochs=s.mode.epochs,
        max_minutes=s.minutes,
        seed=seed,
        threads=s.threads,
        no_maps=not s.mode.maps,
    )


def train_members(s: Settings, backbone: str, spec: str, log: Log) -> list[dict[str, Any]]:
    """Train ``s.members`` models of ``backbone`` (seeds ``seed + k``) under run_step; each
    result holds ``seconds`` and ``ckpt``."""
    from trustpot.config import config_to_dict
    from trustpot.finetune import run_finetune
    from trustpot.uq import fit as F

    results = []
    for k in range(s.members):
        folder = s.out / backbone / f"member_{k}"
        if backbone == "painn":
            cfg = _painn_config(s, spec, s.seed + k)
            config = config_to_dict(cfg)
            config["train"].pop("threads", None)

            def work(where: Path, resuming: bool, what: Any = cfg) -> dict[str, Any]:
                return {"ckpt": str(F.train_once(what, where / "run", log))}

        else:
            opts = _finetune_options(s, spec, s.seed + k)
            config = dataclasses.asdict(opts)
            for name in ("threads", "no_maps"):  # no effect on the model
                config.pop(name)

            def work(where: Path, resuming: bool, what: Any = opts) -> dict[str, Any]:
                run = where / "run"
                run_finetune(what, run, resume=resuming and (run / "last.ckpt").is_file())
                return {"ckpt": str(run / "best.ckpt")}

        log(f"{backbone} member {k + 1}/{s.members} (seed {s.seed + k})")
        results.append(timed_step(folder, config, work, log))
    return results


def fit_methods(
    s: Settings, backbone: str, spec: str, members: list[dict[str, Any]], log: Log
) -> dict[str, dict[str, Any]]:
    """Fit every applicable method of ``backbone``; ``{method: {"seconds", "uq"}}``."""
    from trustpot.config import config_to_dict
    from trustpot.data.splits import read_data
    from trustpot.io.checkpoint import load_model
    from trustpot.uq import fit as F
    from trustpot.uq.ensemble import DeepEnsemble
    from trustpot.uq.perturb import fit_perturbation
    from trustpot.uq.probe import fit_probe

    cal = read_data(f"{spec}:calibration", require=("forces",))
    base_ckpt = members[0]["ckpt"]
    common = {"members": [m["ckpt"] for m in members], "seed": s.seed}
    fitted: dict[str, dict[str, Any]] = {}

    def probe_on(base: str) -> Callable[[Path, bool], dict[str, Any]]:
        def work(where: Path, resuming: bool) -> dict[str, Any]:
            probe = fit_probe(
                load_model(base),
                cal,
                epochs=s.mode.probe_epochs,
                max_minutes=s.minutes,
                seed=s.seed,
                log=log,
                source="calibration",
            )
            F.finish(probe, where, None, "", {"method": "probe", "base": base}, log=log,
                     calibrated_by_fit="calibration")  # fmt: skip
            return {"uq": str(where / "uq.ckpt")}

        return work

    def ensemble(where: Path, resuming: bool) -> dict[str, Any]:
        ens = DeepEnsemble([load_model(m["ckpt"]) for m in members])
        F.finish(ens, where, cal, "calibration", {"method": "ensemble"}, log=log)
        return {"uq": str(where / "uq.ckpt")}

    steps: dict[str, tuple[dict[str, Any], Callable[[Path, bool], dict[str, Any]]]] = {
        "probe": (
            {**common, "base": base_ckpt, "epochs": s.mode.probe_epochs, "minutes": s.minutes},
            probe_on(base_ckpt),
        ),
        "ensemble": (common, ensemble),
    }
    train = read_data(f"{spec}:train")
    n_val = max(1, len(train) // 10)

    perturb_lr = UQB.PERTURB_LR if backbone == "painn" else FOUNDATION_PERTURB_LR

    def perturb(where: Path, resuming: bool) -> dict[str, Any]:
        pert = fit_perturbation(
            load_model(base_ckpt),  # any model with a modulation hook (PaiNN, the adapters)
            train[n_val:],
            train[:n_val],
            max_minutes=s.minutes,
            epochs=s.mode.epochs,
            lr=perturb_lr,
            seed=s.seed,
            n_samples_train=s.mode.perturb_samples[0],
            n_samples=s.mode.perturb_samples[1],
            log=log,
            progress=False,
        )
        F.finish(pert, where, cal, "calibration", {"method": "perturb"}, log=log)
        return {"uq": str(where / "uq.ckpt")}

    perturb_config = {**common, "base": base_ckpt, "minutes": s.minutes,
                      "epochs": s.mode.epochs, "lr": perturb_lr}  # fmt: skip
    if s.mode.perturb_samples != (4, 8):  # the defaults: earlier runs' steps stay reusable
        perturb_config["samples"] = list(s.mode.perturb_samples)
    steps["perturb"] = (perturb_config, perturb)
    if backbone == "foundation":
        zero = {"base": s.foundation, "epochs": s.mode.probe_epochs, "minutes": s.minutes}
        steps["zero-shot-probe"] = ({**common, **zero}, probe_on(s.foundation))
    else:
        cfg = _painn_config(s, spec, s.seed)
        mc_config = config_to_dict(cfg)
        mc_config["train"].pop("threads", None)

        def mc_dropout(where: Path, resuming: bool) -> dict[str, Any]:
            mc = F.train_mc_dropout(cfg, where, MC_DROPOUT, MC_SAMPLES, log)
            F.finish(mc, where, cal, "calibration", {"method": "mc-dropout"}, log=log)
            return {"uq": str(where / "uq.ckpt")}

        steps["mc-dropout"] = ({**mc_config, "dropout": MC_DROPOUT, "samples": MC_SAMPLES},
                               mc_dropout)  # fmt: skip
    for method, (config, work) in steps.items():
        log(f"{backbone}: fitting {method}")
        fitted[method] = timed_step(s.out / backbone / method, config, work, log)
    return fitted


def evaluate(
    s: Settings, backbone: str, spec: str, base_ckpt: str, fitted: dict[str, dict[str, Any]],
    log: Log,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Metrics of every fitted method on every test set, plus the plain model's inference
    seconds per structure: ``{test: {"plain_s": ..., method: {headline and metrics}}}``."""
    from trustpot.calculator import Predictor
    from trustpot.data.splits import read_data
    from trustpot.io.checkpoint import load_model
    from trustpot.uq.base import UQModel
    from trustpot.uq.collect import collect
    from trustpot.uq.report import headline, uq_metrics

    results: dict[str, dict[str, Any]] = {}
    for test in TESTS:
        structures = read_data(f"{spec}:{test}", require=("forces",))

        def plain(
            where: Path, resuming: bool, structures: Any = structures, test: str = test
        ) -> dict[str, Any]:
            predictor = Predictor(load_model(base_ckpt))
            predictor.predict_structures(structures[:1], source=test)  # warm-up
            t0 = time.perf_counter()
            predictor.predict_structures(structures, source=test)
            return {"per_structure_s": (time.perf_counter() - t0) / len(structures)}

        folder = s.out / backbone / "eval" / test
        got = timed_step(folder / "plain", {"base": base_ckpt, "n": len(structures)}, plain, log)
        results[test] = {"plain_s": got["per_structure_s"]}
        for method, fit in fitted.items():

            def work(
                where: Path,
                resuming: bool,
                fit: Any = fit,
                structures: Any = structures,
                test: str = test,
            ) -> dict[str, Any]:
                model = load_model(fit["uq"], UQModel)
                data = collect(model, structures, 16, f"{backbone}/{test}", progress=False)
                metrics = uq_metrics(data)
                return {
                    **headline(metrics),
                    "per_structure_s": data.seconds / len(structures),
                    "metrics": metrics,
                }

            config = {"uq": fit["uq"], "fit_seconds": fit["seconds"], "n": len(structures)}
            results[test][method] = timed_step(folder / method, config, work, log)
            row = results[test][method]
            log(f"{backbone} {method} on {test}: Spearman {row['spearman']:.3f}, "
                f"AUROC {row['auroc']:.3f}, force MAE {row['forces_mae']:.4g}")  # fmt: skip
    return results


def rows_of(
    backbone: str,
    members: list[dict[str, Any]],
    fitted: dict[str, dict[str, Any]],
    evals: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per method of ``backbone`` (n/a rows carry their reason)."""
    member_s = [m["seconds"] for m in members]
    one = float(np.median(member_s))  # one plain model
    train_s = {
        "probe": member_s[0] + fitted["probe"]["seconds"],
        "ensemble": sum(member_s) + fitted["ensemble"]["seconds"],
    }
    if "perturb" in fitted:
        train_s["perturb"] = member_s[0] + fitted["perturb"]["seconds"]
    if "mc-dropout" in fitted:
        train_s["mc-dropout"] = fitted["mc-dropout"]["seconds"]
    if "zero-shot-probe" in fitted:
        train_s["zero-shot-probe"] = fitted["zero-shot-probe"]["seconds"]
    rows = []
    for method in METHODS:
        row: dict[str, Any] = {
            "backbone": backbone,
            "method": method,
            "plain_train_s": one,
            "plain_inference_s": evals["test_ood"]["plain_s"],
        }
        reason = NOT_APPLICABLE.get((backbone, method))
        if reason is not None:
            rows.append({**row, "applicable": False, "reason": reason})
            continue
        ood, ind = evals["test_ood"][method], evals["test_id"][method]
        row.update(
            applicable=True,
            reason="",
            spearman=ood["spearman"],
            auroc=ood["auroc"],
            crps=ood["crps"],
            nll=ood["nll"],
            spearman_id=ind["spearman"],
            forces_mae_id=ind["forces_mae"],
            forces_mae_ood=ood["forces_mae"],
            train_s=train_s[method],
            train_cost=train_s[method] / one,
            inference_s=ood["per_structure_s"],
            inference_cost=ood["per_structure_s"] / evals["test_ood"]["plain_s"],
            metrics={t: evals[t][method]["metrics"] for t in TESTS},
        )
        rows.append(row)
    return rows


def seed_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The two seed claims, tested plainly on these rows."""

    def get(backbone: str, method: str) -> dict[str, Any]:
        return next(r for r in rows if r["backbone"] == backbone and r["method"] == method)

    margins = {b: get(b, "probe")["spearman"] - get(b, "ensemble")["spearman"] for b in BACKBONES}
    finite = all(math.isfinite(m) for m in margins.values())
    larger = finite and margins["foundation"] > margins["painn"]
    perturb = float(get("foundation", "perturb")["spearman"])
    return {
        "perturb_foundation_spearman_ge_0.84": {
            "testable": math.isfinite(perturb),
            "spearman_ood": perturb,
            "painn_spearman_ood": get("painn", "perturb")["spearman"],
            "answer": ("yes" if perturb >= 0.84 else "no")
            if math.isfinite(perturb)
            else "not computable (NaN Spearman)",
        },
        "probe_margin_larger_on_foundation": {
            "testable": finite,
            "margin_foundation": margins["foundation"],
            "margin_painn": margins["painn"],
            "answer": ("yes" if larger else "no") if finite else "not computable (NaN Spearman)",
        },
    }


# -- output ----------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], foundation: str) -> str:
    """The markdown table (out-of-domain ranking and Gaussian scores, both MAEs, costs)."""
    f = UQB._fmt
    head = (
        "| backbone | method | Spearman OOD | AUROC OOD | CRPS OOD | NLL OOD | Spearman ID | "
        "force MAE ID | force MAE OOD | train s (x plain) | inference s/frame (x plain) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = []
    for r in rows:
        name = f"{foundation} fine-tuned" if r["backbone"] == "foundation" else "PaiNN scratch"
        if not r["applicable"]:
            body.append(f"| {name} | {r['method']} | {r['reason']} |" + " |" * 8)
            continue
        body.append(
            f"| {name} | {r['method']} | {f(r['spearman'])} | {f(r['auroc'])} | "
            f"{f(r['crps'])} | {f(r['nll'])} | {f(r['spearman_id'])} | "
            f"{f(r['forces_mae_id'])} | {f(r['forces_mae_ood'])} | "
            f"{r['train_s']:.1f} ({r['train_cost']:.2f}x) | "
            f"{r['inference_s']:.3g} ({r['inference_cost']:.2f}x) |"
        )
    return head + "\n".join(body) + "\n"


def report(
    s: Settings, rows: list[dict[str, Any]], targets: dict[str, Any], header: dict[str, Any]
) -> str:
    """``foundation.md``: settings, table, seed targets."""
    m = s.mode
    lines = [
        f"# Foundation backbones vs PaiNN from scratch ({s.mode_name} mode)\n",
        f"Silica zeolites: {m.n_train} training frames (8 training topologies), {m.n_cal} "
        f"calibration, {m.n_test} in-domain test, {m.n_ood} per out-of-domain topology (PTY, "
        f"UOE). Budget per trained model: {s.minutes} min (at most {m.epochs} epochs); "
        f"{s.foundation} fine-tuned (strategy full, lr {FINETUNE_LR}) and PaiNN from scratch; "
        f"ensembles of {s.members}; PROBE at most {m.probe_epochs} epochs; perturbations "
        f"(fine-tuned from member 0 with the CRPS, {m.perturb_samples[0]} samples per "
        f"structure, {m.perturb_samples[1]} per prediction) one model's budget, perturbation lr "
        f"{UQB.PERTURB_LR} on PaiNN and {FOUNDATION_PERTURB_LR} on {s.foundation}; "
        f"{s.threads} thread(s), seed {s.seed}, git {header['git']}, wall "
        f"{header['wall_s']:.0f} s.\n",
        "Spearman/AUROC: per-frame force MAE against the method's score (force std; "
        "1 - reliability for PROBE), AUROC for the worst 20%; CRPS/NLL on force components "
        "(eV/Å) where a std exists; MAE in eV/Å; costs in seconds and as ratios to one plain "
        "model of the same backbone (training: the median ensemble member; inference: its "
        "plain predictions on the OOD frames). Zero-shot PROBE's training cost is the probe "
        "fit alone.\n",
    ]
    if s.mode_name == "quick":
        lines.append(
            "**Quick mode: these numbers are a smoke test of the script, not results** "
            "(a handful of frames, seconds of training).\n"
        )
    plain = {r["backbone"]: r for r in rows}
    lines.append(
        "One plain model: "
        + "; ".join(
            f"{'fine-tuned ' + s.foundation if b == 'foundation' else 'PaiNN'} "
            f"{plain[b]['plain_train_s']:.1f} s to train (wall clock, loading and graph "
            f"building included), {plain[b]['plain_inference_s']:.3g} s per OOD frame"
            for b in BACKBONES
        )
        + ".\n"
    )
    lines.append(table(rows, s.foundation))
    p = targets["perturb_foundation_spearman_ge_0.84"]
    q = targets["probe_margin_larger_on_foundation"]
    lines += [
        "## Seed targets\n",
        f"- Spearman >= 0.84 out of domain for learned perturbations on a foundation model "
        f"(P-{s.foundation}): **{p['answer']}** ({UQB._fmt(p['spearman_ood'])}; PaiNN's "
        f"perturbations {UQB._fmt(p['painn_spearman_ood'])}).",
        f"- PROBE's OOD Spearman margin over the ensemble larger on the foundation backbone "
        f"than on PaiNN: **{q['answer']}** (foundation {UQB._fmt(q['margin_foundation'])}, "
        f"PaiNN {UQB._fmt(q['margin_painn'])}).\n",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> Settings:
    """Command-line options; an option that cannot be used is an error."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder (steps reused on a rerun)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (CI smoke test)")
    p.add_argument("--foundation", default="chgnet", choices=FOUNDATIONS,
                   help="pretrained model to fine-tune")  # fmt: skip
    p.add_argument("--minutes", type=float, help="budget per trained model (default: the mode's)")
    p.add_argument("--members", type=int, help="ensemble members per backbone (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 by default: on busy cores more threads can be 10x slower)",
    )
    args = p.parse_args(argv)
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    members = mode.members if args.members is None else args.members
    minutes = mode.minutes if args.minutes is None else args.minutes
    if members < 2:
        p.error(f"--members must be >= 2 (an ensemble), got {members}")
    if minutes <= 0:
        p.error(f"--minutes must be positive, got {minutes}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return Settings(Path(args.out), mode_name, mode, args.foundation, minutes, members,
                    args.seed, args.threads)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    s = parse(argv)
    import torch

    from trustpot.models.pretrained import package_available
    from trustpot.registry import lookup

    entry = lookup("pretrained", s.foundation)
    if not package_available(entry.package):
        print(f"{s.foundation} needs the package {entry.package}", file=sys.stderr)
        return 2
    if not ZEOLITES.is_dir():
        print(f"the zeolite data is absent: {ZEOLITES}", file=sys.stderr)
        return 2
    torch.set_num_threads(s.threads)
    s.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(s.out / "log.txt", "a") as handle:
            handle.write(line + "\n")

    from trustpot.errors import ConfigError

    rows: list[dict[str, Any]] = []
    try:
        prepare(s.mode, s.out, s.seed, log)
        spec = str(s.out / "data" / "split.json")
        for backbone in BACKBONES:
            members = train_members(s, backbone, spec, log)
            fitted = fit_methods(s, backbone, spec, members, log)
            evals = evaluate(s, backbone, spec, members[0]["ckpt"], fitted, log)
            rows.extend(rows_of(backbone, members, fitted, evals))
    except ConfigError as err:  # e.g. --out holds steps made with other settings
        print(f"error: {err}", file=sys.stderr)
        return 2
    targets = seed_targets(rows)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    header = {
        "mode": s.mode_name,
        "foundation": s.foundation,
        "minutes_per_model": s.minutes,
        "sizes": dataclasses.asdict(s.mode),
        "members": s.members,
        "finetune_lr": FINETUNE_LR,
        "threads": s.threads,
        "seed": s.seed,
        "git": commit,
        "platform": platform.platform(),
        "wall_s": time.perf_counter() - t0,
    }
    result = {"settings": header, "rows": rows, "seed_targets": targets}
    (s.out / "foundation.json").write_text(json.dumps(result, indent=1))
    text = report(s, rows, targets, header)
    (s.out / "foundation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
