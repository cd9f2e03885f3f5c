"""The compatibility matrix in the docs is generated from the registry and matches the CI matrix."""

import ast
import pathlib

from packaging.version import Version

from unsloth_patch import matrix

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _noxfile_pairs(table: str) -> list:
    """(TRL, transformers) of each row of the list ``table`` (``MATRIX``, ``SMOKE_MATRIX``) in noxfile.py."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    rows = next(node.value for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == table)
    return [(row.elts[0].value, row.elts[1].value) for row in rows.elts]


def test_docs_matrix_is_the_generated_one():
    assert (ROOT / "docs" / "compatibility.md").read_text() == matrix.table(), \
        "regenerate with: python -m unsloth_patch matrix > docs/compatibility.md"


def test_documented_pairs_are_the_ci_sessions():
    assert _noxfile_pairs("MATRIX") == list(matrix.TESTED)
    assert _noxfile_pairs("SMOKE_MATRIX") == list(matrix.SMOKE_TESTED)
    assert not set(matrix.TESTED) & set(matrix.SMOKE_TESTED), "a pair with a full session needs no smoke session"


def test_every_trl_minor_line_from_0_11_has_a_ci_session():
    # The newest minor line of each major bounds the check: a gap below it is a line CI never runs.
    lines = {Version(trl).release[:2] for trl, _ in matrix.TESTED + matrix.SMOKE_TESTED}
    for major in sorted({major for major, _ in lines}):
        first = 11 if major == 0 else 0
        newest = max(minor for m, minor in lines if m == major)
        missing = [f"{major}.{minor}" for minor in range(first, newest + 1) if (major, minor) not in lines]
        assert not missing, f"TRL minor lines without a CI session: {missing}"


def test_old_transformers_gets_the_legacy_varlen_path_in_the_table():
    text = matrix.table()
    row = next(line for line in text.splitlines() if line.startswith("| 0.12.2 | 4.46.3 |"))
    assert "FlashAttention-2 classes hosting our varlen kernels" in row


def test_smoke_rows_are_marked_as_such_in_the_table():
    text = matrix.table()
    for trl, transformers in matrix.SMOKE_TESTED:
        assert f"| {trl} | {transformers} | smoke |" in text
    for trl, transformers in matrix.TESTED:
        assert f"| {trl} | {transformers} | full |" in text
