"""docs/errors.md against the code: every row's bad input is provoked and must raise the row's
error class with the row's message, where ``{name}`` matches any value."""
from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from bad_data import CASES

ERRORS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
COLUMNS = ["Case", "Bad input", "Message", "Error", "Raised"]


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of every table, as {column: cell}; a cell's code span is unwrapped, ``\\|`` is a pipe."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        cells = [m.group(2) if (m := re.fullmatch(r"(`+)(.*?)\1", c)) else c for c in cells]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):  # not the separator row
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def message_pattern(template: str) -> re.Pattern:
    """The message as a pattern: its text literally, each ``{name}`` as any value."""
    parts = [re.escape(text) + ("" if name is None else "(.*?)")
             for text, name, _, _ in string.Formatter().parse(template)]
    return re.compile("".join(parts), re.S)


ROWS = table_rows(ERRORS.read_text())


def test_the_tables_have_the_columns_and_one_row_per_case():
    assert ROWS and all(list(row) == COLUMNS for row in ROWS)
    cases = [row["Case"] for row in ROWS]
    assert len(cases) == len(set(cases))
    assert not set(CASES) - set(cases), f"cases with no row in docs/errors.md: {sorted(set(CASES) - set(cases))}"


def test_message_patterns():
    pattern = message_pattern("{file}: row {row} of [0, {n}) {{literal}}.")
    assert pattern.fullmatch("/a/b.npy: row 3 of [0, 10) {literal}.")
    assert not pattern.fullmatch("/a/b.npy: row 3 of [0, 10) {literal}. And more.")


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row["Case"])
def test_each_row_is_what_its_input_raises(row, tmp_path):
    assert row["Case"] in CASES, f"no case in tests/bad_data.py provokes the row {row['Case']}"
    with pytest.raises(Exception) as raised:
        CASES[row["Case"]].provoke(tmp_path)
    assert row["Error"] in {c.__name__ for c in type(raised.value).__mro__}
    assert message_pattern(row["Message"]).fullmatch(str(raised.value)), \
        f"docs/errors.md says:\n{row['Message']}\nthe code raised:\n{raised.value}"
