"""README's compatibility matrix is exactly what the matrix tests recorded (``compat_results.json``): every node x
every column has a result, none is wrong, and the generated block between the markers is current.  Runs after
``test_compat_dit.py`` and ``test_compat_matrix.py`` (file order), which write the results."""
from __future__ import annotations

import compat_report as R


def test_every_cell_has_a_result_and_none_is_wrong():
    cells = R.load()
    assert not R.missing(cells), f"cells without a result (run tests/host/test_compat*.py): {R.missing(cells)}"
    wrong = {k: v["note"] for k, v in cells.items() if v["status"] == R.WRONG}
    assert not wrong, wrong
    assert all(v["note"].strip() for v in cells.values() if v["status"] == R.REFUSED), "a refusal must say why"


def test_readme_block_is_current():
    with open(R.README, encoding="utf-8") as f:
        block = R.readme_block(f.read())
    assert block is not None, f"README has no {R.BEGIN} ... {R.END} block"
    assert block == R.render(R.load()), "README's compatibility matrix is out of date: python -m tests.host.compat_report"


def test_render_is_deterministic_and_marks_every_status():
    cells = {R.cell_key(n, c): {"status": R.WORKS, "note": ""} for n, _ in R.NODES for c, _, _ in R.COLUMNS}
    first = next(iter(cells))
    cells[first] = {"status": R.REFUSED, "note": "because | reasons"}
    a, b = R.render(cells), R.render(dict(reversed(list(cells.items()))))
    assert a == b and a.startswith(R.BEGIN) and a.endswith(R.END)
    assert "⛔ 1" in a and "1. " in a and "because / reasons" in a and "not run" not in a
    assert "not run" in R.render({})
