"""One table of ratios: every benchmark row is a measured figure against a baseline measured
in the same run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One figure of the backend and its bare baseline, in the same unit."""

    name: str
    measured: float
    baseline: float
    unit: str
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        """measured / baseline."""
        return self.measured / self.baseline

    @property
    def cost(self) -> float:
        """How much worse than the baseline, as a fraction (0 = as good, 0.1 = 10 % worse)."""
        return 1 / self.ratio - 1 if self.higher_is_better else self.ratio - 1


def print_table(rows: Iterable[Row], title: str = "") -> None:
    """Print the rows as one fixed-width table."""
    rows = list(rows)
    width = max([len(row.name) for row in rows] + [40])
    if title:
        print(title)
    print(f"{'benchmark':<{width}} {'backend':>11} {'baseline':>11} {'unit':<8} {'ratio':>7}  note")
    for row in rows:
        print(
            f"{row.name:<{width}} {row.measured:>11.3f} {row.baseline:>11.3f} {row.unit:<8}"
            f" {row.ratio:>7.3f}  {row.note}"
        )
