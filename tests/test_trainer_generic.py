"""The generalised trainer: loss kinds, parameter groups, validation = training loss, progress
by budget, resume of a ported loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from trustpot.config import TrainConfig
from trustpot.data.structures import Structure
from trustpot.errors import ConfigError
from trustpot.train.datasets import ItemDataset
from trustpot.train.objectives import BCELoss, CallableLoss
from trustpot.train.run_folder import state_payload
from trustpot.train.trainer import Objective, ParamGroup, Trainer, TrainingError


def _data(n: int = 24, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
    return x, y


def _dataset(x: Tensor, y: Tensor) -> ItemDataset[int]:
    return ItemDataset(list(range(len(x))), lambda idx: (x[idx], y[idx]), "toy")


def _mse(model: nn.Module, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    xb, yb = batch
    err = model(xb).squeeze(-1) - yb
    return {"mse": (err**2).sum()}, {"mse": torch.tensor(float(len(yb)))}


def _trainer(cfg: TrainConfig, model: nn.Module | None = None, **kw: Any) -> Trainer:
    torch.manual_seed(0)
    model = model or nn.Linear(3, 1).double()
    objective = Objective("fit", "main", loss=CallableLoss(_mse, {"mse": 1.0}))
    kw.setdefault("progress", False)
    return Trainer(model, [objective], cfg, payload_fn=state_payload("toy"), **kw)


def test_validation_loss_is_the_training_loss_of_the_validation_set(tmp_path: Path) -> None:
    x, y = _data()
    trainer = _trainer(TrainConfig(epochs=2, batch_size=5, ema_decay=0.0, lr=1e-2))
    trainer.fit({"main": _dataset(x, y)}, {"main": _dataset(x, y)}, tmp_path)
    metrics = trainer.validate({"main": _dataset(x, y)})
    with torch.no_grad():
        expected = float(((trainer.model(x).squeeze(-1) - y) ** 2).mean())
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-12)


def test_parameter_groups_follow_the_schedule_from_their_own_peaks(tmp_path: Path) -> None:
    x, y = _data()
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).double()
    groups = [
        ParamGroup(list(model[0].parameters()), lr=1e-2, name="first"),
        ParamGroup(list(model[1].parameters()), lr=1e-3, name="second"),
    ]
    cfg = TrainConfig(epochs=4, batch_size=6, ema_decay=0.0, lr=5e-3, min_lr=5e-5, warmup_epochs=0)
    trainer = _trainer(cfg, model, param_groups=groups)
    trainer.fit({"main": _dataset(x, y)}, {"main": _dataset(x, y)}, tmp_path)
    lr0, lr1 = (g["lr"] for g in trainer.optimizer.param_groups)
    assert lr0 / lr1 == pytest.approx(10.0)
    assert lr0 < 1e-2  # the cosine schedule has lowered both
    frozen = nn.Linear(3, 1).double()
    before = frozen.weight.detach().clone()
    model2 = nn.Sequential(frozen, nn.Linear(1, 1).double())
    trainer = _trainer(
        cfg,
        model2,
        param_groups=[
            ParamGroup(list(frozen.parameters()), frozen=True),
            ParamGroup(list(model2[1].parameters())),
        ],
    )
    trainer.fit({"main": _dataset(x, y)}, {}, tmp_path / "b")
    assert torch.equal(frozen.weight, before)
    with pytest.raises(ConfigError, match="not in the model"):
        _trainer(cfg, nn.Linear(3, 1).double(), param_groups=[ParamGroup([nn.Parameter(x)])])


def test_resume_is_bit_identical_and_checks_the_config(tmp_path: Path) -> None:
    x, y = _data()
    cfg = TrainConfig(epochs=6, batch_size=5, ema_decay=0.9, lr=1e-2, schedule="plateau")
    full = _trainer(cfg, run_config={"a": 1})
    full.fit({"main": _dataset(x, y)}, {"main": _dataset(x, y)}, tmp_path / "full")
    half = _trainer(TrainConfig(**{**cfg.__dict__, "epochs": 3}), run_config={"a": 1})
    half.fit({"main": _dataset(x, y)}, {"main": _dataset(x, y)}, tmp_path / "half")
    again = _trainer(cfg, run_config={"a": 1})
    assert again.resume(tmp_path / "half") and again.epoch == 3
    again.fit({"main": _dataset(x, y)}, {"main": _dataset(x, y)}, tmp_path / "half")
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    other = _trainer(cfg, run_config={"a": 2})
    with pytest.raises(ConfigError, match="a differ"):
        other.resume(tmp_path / "half")


def test_progress_bar_counts_the_budget_not_the_epochs() -> None:
    timed = _trainer(TrainConfig(epochs=1000, max_minutes=4.0, ema_decay=0.0), progress=True)
    bar = timed._bar()
    assert bar.total == pytest.approx(240.0) and bar.unit == "s"
    bar.close()
    plain = _trainer(TrainConfig(epochs=7, ema_decay=0.0), progress=True)
    bar = plain._bar()
    assert bar.total == 7 and bar.unit == "epoch"
    bar.close()


def test_bce_loss_matches_torch() -> None:
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    loss = BCELoss(lambda m, b: b, pos_weight=3.0)
    sums, counts = loss.sums(nn.Identity(), (logits, y), True)
    ref = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0, dtype=torch.float64))(logits, y)
    assert float(loss.combine(sums, counts)) == pytest.approx(float(ref), rel=1e-12)


def test_perturbation_fit_resumes_and_reuses_its_run_dir(
    ethanol_structures: list[Structure], tmp_path: Path
) -> None:
    from trustpot.models.build import build_potential
    from trustpot.uq.perturb import fit_perturbation

    hypers = {"n_features": 8, "n_layers": 2, "cutoff": 4.0}
    base = build_potential("schnet", hypers, ethanol_structures, seed=0).eval()
    train, valid = ethanol_structures[:6], ethanol_structures[6:8]
    kw: dict = dict(epochs=3, batch_size=3, progress=False, finetune_backbone=False)
    straight = fit_perturbation(base, train, valid, log=lambda _: None, **kw)
    # a run killed during its second epoch (the hook raises before that epoch's checkpoint)
    run = tmp_path / "run"

    class Killed(Exception):
        pass

    def killer(line: str) -> None:
        if line.startswith("perturb epoch 2"):
            raise Killed

    with pytest.raises(Killed):
        fit_perturbation(base, train, valid, log=killer, run_dir=run, **kw)
    lines: list[str] = []
    resumed = fit_perturbation(base, train, valid, log=lines.append, run_dir=run, **kw)
    assert any("resuming" in line for line in lines)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert resumed.fit_report["best_epoch"] == straight.fit_report["best_epoch"]
    # the finished run is reused as it is; other options are refused
    again = fit_perturbation(base, train, valid, log=lambda _: None, run_dir=run, **kw)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    with pytest.raises(ConfigError, match="epochs differ"):
        fit_perturbation(base, train, valid, log=lambda _: None, run_dir=run, **{**kw, "epochs": 4})


def test_non_finite_loss_is_caught_when_checked_once_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator the step losses are read once per epoch: a NaN is still an error
    that names the epoch and its steps."""
    x, y = _data()
    y[3] = float("nan")
    trainer = _trainer(TrainConfig(epochs=2, batch_size=5, ema_decay=0.0))
    monkeypatch.setattr(trainer, "_host_checks", lambda: False)
    with pytest.raises(TrainingError, match=r"epoch 0, steps 0-4"):
        trainer.fit({"main": _dataset(x, y)}, {}, tmp_path)
    trainer = _trainer(TrainConfig(epochs=2, batch_size=5, ema_decay=0.0))
    with pytest.raises(TrainingError, match=r"epoch 0, step \d+;"):  # per step on the CPU
        trainer.fit({"main": _dataset(x, y)}, {}, tmp_path / "cpu")


def test_train_step_returns_the_loss_as_a_tensor(tmp_path: Path) -> None:
    x, y = _data()
    trainer = _trainer(TrainConfig(epochs=1, batch_size=5, ema_decay=0.9))
    loss = trainer.train_step([(x[:5], y[:5])])
    assert isinstance(loss, Tensor) and loss.dim() == 0 and trainer.step == 1
    assert float(loss) > 0
