"""One row of the doctor's table: a check, what it measured, what was expected and the result."""

from dataclasses import dataclass


@dataclass
class Check:
    name: str
    measured: str
    expected: str
    status: str  # "pass", "FAIL" or "info" (reported, never fails)


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def format_table(checks: list[Check]) -> str:
    rows = [("check", "measured", "expected", "result")] + [(c.name, c.measured, c.expected, c.status) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
