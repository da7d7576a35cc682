"""Collects the benchmark results of this folder and prints them as one table at the end."""
import pytest

RESULTS = []  # one dict per measured configuration, filled by the benchmark modules


@pytest.fixture
def results():
    return RESULTS


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    columns = list(RESULTS[0])
    rows = [[str(row.get(c, "")) for c in columns] for row in RESULTS]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    terminalreporter.section("effective bandwidth (SPEC section 3)")
    terminalreporter.write_line("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        terminalreporter.write_line("  ".join(v.rjust(w) for v, w in zip(row, widths)))
