"""``metrics.csv``: one row per epoch, appended as training goes, trimmed on resume."""

from __future__ import annotations

import csv
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm


def budget_bar(
    desc: str, max_minutes: float, epochs: int, elapsed: float, epoch: int, enabled: bool
) -> tqdm:
    """A progress bar over the budget: seconds of ``max_minutes`` when set, else epochs
    (``elapsed`` seconds and ``epoch`` already done, e.g. by a resumed run)."""
    common: dict[str, Any] = dict(
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    if max_minutes > 0:
        budget = 60.0 * max_minutes
        return tqdm(
            total=round(budget, 1),
            initial=round(min(elapsed, budget), 1),
            unit="s",
            bar_format=(
                "{l_bar}{bar}| {n:.0f}/{total:.0f} s of budget [{elapsed}<{remaining}{postfix}]"
            ),
            **common,
        )
    return tqdm(total=epochs, initial=epoch, unit="epoch", **common)


class MetricsLog:
    """Appends epoch rows to a CSV file whose columns are the first row's keys.

    Args:
        path: the file (created with a header on the first row).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None

    def append(self, row: Mapping[str, Any]) -> None:
        """Write ``row`` (keys not among the columns are dropped)."""
        new_file = not self.path.exists()
        if self.fields is None:
            self.fields = self._header() if not new_file else list(row)
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def _header(self) -> list[str]:
        with open(self.path, newline="") as handle:
            return next(csv.reader(handle), [])

    def drop_from(self, epoch: int) -> None:
        """Remove rows of epochs >= ``epoch`` (written after the last checkpoint of a killed
        run, and about to be redone)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        header, body = rows[0], rows[1:]
        kept = [r for r in body if r and int(r[0]) < epoch]
        if len(kept) == len(body):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *kept])
        tmp.replace(self.path)
