"""Validation force MAE against wall clock of the two 5-minute runs (writes curve.png here)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trustpot.train.plateau import learning_curve  # noqa: E402

HERE = Path(__file__).parent
fig, ax = plt.subplots(figsize=(5.5, 3.6))
for flag, label in (("false", "eager step"), ("true", "train.compile")):
    curve = learning_curve(HERE / f"metrics_compile_{flag}.csv", ["val_forces_mae"])
    minutes = [row["minutes"] * 60 for row in curve]
    ax.plot(minutes, [1000 * row["val_forces_mae"] for row in curve], label=label)
ax.set_xlabel("wall clock (s, compilation included)")
ax.set_ylabel("validation force MAE (meV/Å)")
ax.set_yscale("log")
ax.set_title("PaiNN, 3BPA train_300K, one CPU thread")
ax.legend()
fig.tight_layout()
fig.savefig(HERE / "curve.png", dpi=120)
