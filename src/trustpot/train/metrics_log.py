"""``metrics.csv``: one row per epoch, appended as training goes, trimmed on resume."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
