"""``status`` and ``plan`` above ``PLAIN_TABLE_ROWS`` rows print a plain fixed-width table with
the same columns and text as rich's (issue 16: rich took 10-25 s for 10,000 rows)."""

from __future__ import annotations

from rotator import cli


def _rows(n: int) -> list[list[cli.Cell]]:
    return [[f"a{i}/openai", ("success", "[green]success[/]"), f"[x{i}] why"]
            for i in range(n)]


def test_a_long_table_is_plain_with_every_cell(capsys) -> None:
    n = cli.PLAIN_TABLE_ROWS + 1
    cli._print_rows("title", ("credential", "outcome", "why"), _rows(n))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["credential", "outcome", "why"]
    assert len(lines) == n + 3
    assert lines[3] == "a0/openai    success  [x0] why"  # no markup, brackets kept
    assert lines[-1].split("  ")[0] == f"a{n - 1}/openai"


def test_a_short_table_stays_rich(capsys) -> None:
    cli._print_rows("title", ("credential", "outcome", "why"), _rows(2))
    out = capsys.readouterr().out
    assert "┃" in out or "│" in out
    assert "[x1] why" in out and "[green]" not in out
