"""Write a `make bench` run's table into the README, between its bench-table markers.

    make bench-readme                                   # runs every benchmark, then this
    .venv/bin/python bench/readme_table.py RUN.txt      # from a saved `make bench` output

The notes column is left out (the README explains each row); the rows must be those that
bench/report.py's CPU_ROWS declares (GPU rows come on top when the run had CUDA).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
START = "<!-- bench-table: written by bench/readme_table.py from a `make bench` run -->"
END = "<!-- /bench-table -->"
_TITLE = re.compile(r"^All benchmarks, one run \((\d+) s\)$")
_ROW = re.compile(r"^(?P<name>.+?)\s+[-\d.]+\s+[-\d.]+\s+\S+\s+[-\d.]+(?:  .*)?$")


def table_of(run_output: str) -> tuple[int, list[str]]:
    """The run's duration in seconds and its table (header and rows, notes left out)."""
    lines = run_output.splitlines()
    title = next((i for i, line in enumerate(lines) if _TITLE.match(line)), None)
    if title is None:
        raise ValueError("no 'All benchmarks, one run (N s)' title: not a make bench output")
    seconds = int(_TITLE.match(lines[title]).group(1))  # type: ignore[union-attr]
    header, *rest = lines[title + 1 :]
    note_column = header.index("  note") if "  note" in header else len(header)
    table = [header[:note_column].rstrip()]
    for line in rest:
        if not _ROW.match(line):
            break
        table.append(line[:note_column].rstrip())
    return seconds, table


def row_names(table: list[str]) -> list[str]:
    """The benchmark names of a table's rows."""
    return [match.group("name").rstrip() for line in table[1:] if (match := _ROW.match(line))]


def replace_table(readme: str, run_output: str) -> str:
    """`readme` with the text between the markers replaced by the run's table."""
    seconds, table = table_of(run_output)
    gpu = any(name.startswith("real-size") for name in row_names(table))
    where = "with CUDA" if gpu else "no CUDA, so no GPU rows"
    block = (
        f"{START}\nOne run of `make bench` on this project's 2-core CPU machine ({where}; "
        f"{seconds} s):\n\n```\n" + "\n".join(table) + f"\n```\n{END}"
    )
    start, end = readme.index(START), readme.index(END) + len(END)
    return readme[:start] + block + readme[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md's benchmark table from a saved run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_output", type=Path, help="what `make bench` printed")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import CPU_ROWS, GPU_ROW_PREFIX

    run_output = args.run_output.read_text()
    names = [n for n in row_names(table_of(run_output)[1]) if not n.startswith(GPU_ROW_PREFIX)]
    if tuple(names) != CPU_ROWS:
        print("error: the run's rows are not bench/report.py's CPU_ROWS", file=sys.stderr)
        return 1
    README.write_text(replace_table(README.read_text(), run_output))
    print(f"README.md: benchmark table updated ({len(names)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
