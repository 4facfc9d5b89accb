"""The README's benchmark table: written by a command from a real run, with exactly the rows
the benchmarks declare."""

from __future__ import annotations

import sys

import pytest

from config import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import readme_table
from report import CPU_ROWS, Row, print_table


def test_the_readme_table_has_exactly_the_declared_rows() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme[readme.index(readme_table.START) : readme.index(readme_table.END)]
    table = block[block.index("```\n") + 4 : block.rindex("```")].strip().splitlines()
    names = readme_table.row_names(table)
    assert tuple(name for name in names if not name.startswith("real-size")) == CPU_ROWS


def test_a_run_s_table_replaces_only_what_is_between_the_markers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [Row(name, 2.0, 1.0, "req/s", True, f"note {i}") for i, name in enumerate(CPU_ROWS)]
    print_table(rows, title="All benchmarks, one run (123 s)")
    run_output = "running the storage benchmark...\n" + capsys.readouterr().out
    readme = f"before\n{readme_table.START}\nold table\n{readme_table.END}\nafter\n"
    updated = readme_table.replace_table(readme, run_output + "GPU rows: skipped\n")
    assert updated.startswith(f"before\n{readme_table.START}\n")
    assert updated.endswith(f"{readme_table.END}\nafter\n")
    assert "old table" not in updated
    assert "no CUDA, so no GPU rows; 123 s" in updated
    assert "note 0" not in updated  # the notes column is left out
    written = updated[updated.index("```\n") + 4 : updated.rindex("```")].strip().splitlines()
    assert tuple(readme_table.row_names(written)) == CPU_ROWS
    assert written[1].split()[-1] == "2.000"  # the ratio column is kept
