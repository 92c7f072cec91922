"""SchNetPack's PaiNN: the speed peer of trustpot's PaiNN in ``speed.py``.

Runs only with the Python of ``benchmarks/.schnetpack-venv`` (schnetpack, torch, numpy, ase;
trustpot is not imported): ``speed.py`` starts it as ``--worker schnetpack``.

The model is built with SchNetPack's own modules, as its tutorials build a force field, at the
size of trustpot's default PaiNN (``trustpot.models.painn``: 64 features, 3 interactions, 20
Bessel functions, cosine cutoff at 5 Å): ``spk.representation.PaiNN(n_atom_basis=64,
n_interactions=3, radial_basis=BesselRBF(20, 5 Å), cutoff_fn=CosineCutoff(5 Å))``, an
``Atomwise`` energy head (64 -> 32 -> 1, SiLU: trustpot's head), ``Forces`` by autograd, inside
a ``NeuralNetworkPotential`` with ``PairwiseDistances`` as input module and the tutorials'
postprocessors (``CastTo64``, ``AddOffsets`` of the energy mean, here 0). float32. Weights are
untrained: speed does not depend on them.

MD goes through SchNetPack's ASE calculator, ``schnetpack.interfaces.SpkCalculator``, loading the
saved model from a file as a user would, with energies in eV and positions in Å. Its neighbour
list is the calculator's required ``neighbor_list`` transform; SchNetPack has no default, and its
ASE tutorial passes ``ASENeighborList(cutoff)`` (a fresh list every step): that is the row
``schnetpack-painn``. SchNetPack also offers ``SkinNeighborList`` (a Verlet list reused while no
atom moved more than half the skin, default skin 0.3 Å) as an opt-in wrapper: the row
``schnetpack-painn-skin`` times it around the same ASE list (MD only: its model is the same).

Training rows time SchNetPack's model on the same batches as trustpot's (built once, before
timing, with the same ``ASENeighborList``): forward, forces with the graph kept, backward of a
per-atom energy + 10 x force squared loss, AdamW (amsgrad) step.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speed_common import (
    CUTOFF,
    REPO,
    TORCH_PIN,
    Settings,
    check_torch_pin,
    common_versions,
    loadavg,
    read_frames,
    record,
    set_threads,
    venv_with_torch,
)

SCHNETPACK_VENV = REPO / "benchmarks" / ".schnetpack-venv"
SCHNETPACK_PIN = "schnetpack==2.2.0"
NOT_MEASURED = "not measured (run with --install-schnetpack)"
#: trustpot's default PaiNN hyper-parameters (``PaiNNHypers``), mirrored here
PAINN_FEATURES, PAINN_LAYERS, PAINN_RBF = 64, 3, 20
#: untrained force RMS / label force RMS that the peer is scaled to (see :func:`build_painn`)
FORCE_RMS_FRACTION = 0.1
#: the rows this worker writes: SchNetPack's default (tutorial) list, and its skin list
MODELS = ("schnetpack-painn", "schnetpack-painn-skin")


def schnetpack_python() -> Path:
    """The Python of ``benchmarks/.schnetpack-venv``."""
    return SCHNETPACK_VENV / "bin" / "python"


def install_schnetpack() -> None:
    """Create ``benchmarks/.schnetpack-venv`` with the CPU torch pin and schnetpack 2.2.0.

    torch is installed first, alone (``torch==2.13.0`` resolves to the CPU build for this
    Python; an unpinned torch would pull a CUDA build of several GB). schnetpack 2.2.0 declares
    ``Requires-Python >=3.12`` while the CPU build of torch 2.13.0 at hand is for CPython 3.11;
    its code runs on 3.11, so it is installed with ``--no-deps --ignore-requires-python`` and its
    declared requirements (read from its metadata) are installed next, with the torch pin
    repeated so that none of them can replace torch. No extra package index is used.
    """
    py = schnetpack_python()
    pip = venv_with_torch(SCHNETPACK_VENV)
    subprocess.run([*pip, "--no-deps", "--ignore-requires-python", SCHNETPACK_PIN], check=True)
    reqs = (
        "import importlib.metadata as m; "
        "print('\\n'.join(r.split(';')[0].replace(' ', '') "
        "for r in m.requires('schnetpack') if 'extra ==' not in r))"
    )
    got = subprocess.run([str(py), "-c", reqs], check=True, capture_output=True, text=True)
    subprocess.run([*pip, *got.stdout.split(), TORCH_PIN], check=True)
    check_torch_pin(SCHNETPACK_VENV, "schnetpack, torch")


def build_painn(frames: Sequence[Any]) -> Any:
    """SchNetPack's PaiNN potential at trustpot's default PaiNN size (float32).

    The energy head's last layer is rescaled so that the untrained model's force RMS on
    ``frames`` is :data:`FORCE_RMS_FRACTION` of the labels', about what trustpot's untrained
    PaiNN gives (0.13 of 1.24 eV/Å on ethanol). With SchNetPack's raw initialisation the
    forces are larger than the labels' and MD heats up to thousands of K within the timed
    25 fs (even at the labels' RMS: random forces only heat), so its skin list would be rebuilt
    far more often than trustpot's, or than in real MD near 300 K.
    """
    import numpy as np
    import schnetpack as spk
    import schnetpack.transform as trn
    import torch
    from schnetpack.interfaces import AtomsConverter

    painn = spk.representation.PaiNN(
        n_atom_basis=PAINN_FEATURES,
        n_interactions=PAINN_LAYERS,
        radial_basis=spk.nn.BesselRBF(n_rbf=PAINN_RBF, cutoff=CUTOFF),
        cutoff_fn=spk.nn.CosineCutoff(CUTOFF),
    )
    model = spk.model.NeuralNetworkPotential(
        representation=painn,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[
            spk.atomistic.Atomwise(n_in=PAINN_FEATURES, output_key="energy"),
            spk.atomistic.Forces(energy_key="energy", force_key="forces"),
        ],
        postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True)],
    )
    model = model.float().eval()
    convert = AtomsConverter(neighbor_list=trn.ASENeighborList(cutoff=CUTOFF))
    got = np.concatenate([model(convert(a))["forces"].detach().numpy() for a in frames])
    want = np.concatenate([a.get_forces() for a in frames])
    last = model.output_modules[0].outnet[-1]
    with torch.no_grad():
        factor = FORCE_RMS_FRACTION * float(np.sqrt(np.mean(want**2) / np.mean(got**2)))
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return model


def _batches(frames: Sequence[Any], size: int) -> list[tuple[dict[str, Any], Any, Any]]:
    """Inputs (SchNetPack's converter, ``ASENeighborList``), energies [n] eV and forces
    [n_atoms, 3] eV/Å (float32) of consecutive chunks of ``size`` frames."""
    import numpy as np
    import schnetpack.transform as trn
    import torch
    from schnetpack.interfaces import AtomsConverter

    convert = AtomsConverter(neighbor_list=trn.ASENeighborList(cutoff=CUTOFF))
    out = []
    for start in range(0, len(frames), size):
        chunk = list(frames[start : start + size])
        energy = torch.tensor([a.get_potential_energy() for a in chunk], dtype=torch.float32)
        forces = torch.from_numpy(np.concatenate([a.get_forces() for a in chunk])).float()
        out.append((convert(chunk), energy, forces))
    return out


def schnetpack_worker(settings: Settings) -> dict[str, Any]:
    """Time SchNetPack's PaiNN (training, MD with the default and the skin neighbour list)."""
    import schnetpack as spk
    import schnetpack.transform as trn
    import torch
    from schnetpack.interfaces import SpkCalculator

    torch.set_default_dtype(torch.float32)
    out: dict[str, Any] = {"code": "schnetpack", "models": {}}
    out["threads"] = set_threads(settings.threads)
    out["versions"] = {"schnetpack": spk.__version__, **common_versions()}
    out["loadavg_at_start"] = loadavg()
    out["neighbor_lists"] = {
        "schnetpack-painn": f"ASENeighborList(cutoff={CUTOFF})",
        "schnetpack-painn-skin": f"SkinNeighborList(ASENeighborList(cutoff={CUTOFF})), skin 0.3 Å",
    }
    for ds in settings.datasets:
        frames = read_frames(settings, ds)
        torch.manual_seed(settings.seed)
        model = build_painn(frames)
        batches = _batches(frames, ds.batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
        model.train()

        def step(batch: Any, model: Any = model, opt: Any = opt) -> None:
            inputs, energy, forces = batch
            opt.zero_grad(set_to_none=True)
            pred = model(dict(inputs))  # the model writes its outputs into the dict it gets
            n_atoms = inputs[spk.properties.n_atoms].to(energy.dtype)
            de = (pred["energy"].to(energy.dtype) - energy) / n_atoms
            loss = (de**2).mean() + 10.0 * ((pred["forces"] - forces) ** 2).mean()
            loss.backward()
            opt.step()

        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "painn.pt")
            torch.save(model.eval(), path)  # saved and loaded as a user would

            def calc(skin: bool, path: str = path) -> Any:
                nl: Any = trn.ASENeighborList(cutoff=CUTOFF)
                if skin:
                    nl = trn.SkinNeighborList(nl)
                return SpkCalculator(path, nl, energy_unit="eV", position_unit="Ang")

            model.train()
            record(out, MODELS[0], ds, frames, settings, model, step, batches, lambda: calc(False))
            record(out, MODELS[1], ds, frames, settings, model, None, [], lambda: calc(True))
    out["loadavg_at_end"] = loadavg()
    return out
