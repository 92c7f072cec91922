import csv, sys, tempfile, torch
from pathlib import Path
from trustpot.config import load_config
from trustpot.train.run import run_training
def run(dev, lr, extra=()):
    cfg = load_config(None, [f"data.train=.gpu-data/3bpa/train_300K.xyz", "data.max_train=100", "model.name=painn",
        "model.dtype=float64", f"train.device={dev}", "train.epochs=2", f"train.lr={lr}", "train.checkpoint_every=1000", *extra])
    with tempfile.TemporaryDirectory() as t:
        run_training(cfg, Path(t) / "r")
        rows = list(csv.DictReader(open(Path(t) / "r" / "metrics.csv")))
    return [float(r["train_loss"]) for r in rows], [float(r["val_forces_mae"]) for r in rows]
res = {}
for lr in (1e-2, 1e-3):
    for dev in ("cpu", "cuda", "cuda"):
        res.setdefault(lr, []).append(run(dev, lr))
for lr, rs in res.items():
    print("lr", lr)
    for r in rs: print("  ", r)
torch.use_deterministic_algorithms(True)
print("deterministic cuda", run("cuda", 1e-2), run("cuda", 1e-2))
