"""Equal-epoch A/B of ACE-small variants on 3BPA (train_300K split -> test_300K, ood_mixedT).

The record of how ``table.md`` was measured: it patches the ACE code as it was *before* the
two changes became the defaults (the parent of commit 12c9c76), so it does not run as-is on
later code. With the changes in, the mixing comparison is ``ace:element_mix_a=false`` in
``benchmarks/accuracy.py`` (the radial initialisation has no switch).

    python ab.py VARIANT SEED EPOCHS OUT      # VARIANT: base, radial-unit, mixa-element, both
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import accuracy  # noqa: E402  (benchmarks/accuracy.py: the task's splits)

import trustpot.models.ace as ace  # noqa: E402
from trustpot.cli.main import main as trustpot  # noqa: E402
from trustpot.models.ace_blocks import IrrepsLinear  # noqa: E402
from trustpot.nn import scatter_sum  # noqa: E402

VARIANT = sys.argv[1]
ORIGINAL_INIT = ace.AceInteraction.__init__


def patched_init(self: Any, hypers: Any, lmax_in: int, lmax_out: int, n_types: int, avg: float) -> None:  # noqa: E501
    ORIGINAL_INIT(self, hypers, lmax_in, lmax_out, n_types, avg)
    f, la = hypers.n_features, hypers.sh_lmax
    self.element_mix = VARIANT in ("mixa-element", "both") and lmax_in == 0  # the first layer
    if self.element_mix:
        self.mix_a = IrrepsLinear(la, la, f, f, n_types=n_types)
    if VARIANT in ("radial-unit", "both"):
        linears = [m for m in self.radial.modules() if isinstance(m, nn.Linear)]
        for k, linear in enumerate(linears):
            gain = 1.0 if k == 0 else 1.679  # SiLU's second-moment gain after an activation
            nn.init.normal_(linear.weight, 0.0, gain / math.sqrt(linear.in_features))
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


def patched_forward(
    self: Any, h: Tensor, types: Tensor, y: Tensor, rbf: Tensor, fcut: Tensor, index: Tensor
) -> Tensor:
    i, j = index[0], index[1]
    w = (self.radial(rbf) * fcut.unsqueeze(-1)).view(rbf.shape[0], self.tp.n_paths, -1)
    messages = self.tp(self.up(h)[j], y, w)
    onehot = nn.functional.one_hot(types, self.n_types).to(h.dtype)
    summed = scatter_sum(messages, i, h.shape[0]) / self.norm
    a = self.mix_a(summed, onehot) if self.element_mix else self.mix_a(summed)
    out: Tensor = self.mix_b(self.product(a, onehot)) + self.skip(h, onehot)
    return out


def main() -> None:
    seed, epochs, out = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    torch.set_num_threads(1)
    ace.AceInteraction.__init__ = patched_init  # type: ignore[method-assign]
    ace.AceInteraction.forward = patched_forward  # type: ignore[method-assign]
    task = accuracy.build_task("3bpa", accuracy.SIZES["full"], 0, out.parent / "data", print)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args = ["train", "--train", task.train, "--valid", task.valid, "--model", "ace"]
    args += ["--epochs", str(epochs), "--seed", str(seed), "--out", str(out / "model")]
    assert trustpot([*args, "-o", "train.threads=1"]) == 0
    result: dict[str, Any] = {"variant": VARIANT, "seed": seed, "epochs": epochs}
    result["train_s"] = time.perf_counter() - t0
    for name, spec in task.tests.items():
        ev = out / f"eval_{name}"
        assert trustpot(["eval", str(out / "model" / "best.ckpt"), spec, "--out", str(ev)]) == 0
        metrics = json.loads((ev / "metrics.json").read_text())
        result[name] = {k: v for k, v in metrics.items() if k.startswith("forces_")}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
