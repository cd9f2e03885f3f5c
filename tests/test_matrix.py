"""The compatibility matrix in the docs is generated from the registry and matches the CI matrix."""

import ast
import pathlib

from unsloth_patch import matrix

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_matrix_is_the_generated_one():
    assert (ROOT / "docs" / "compatibility.md").read_text() == matrix.table(), \
        "regenerate with: python -m unsloth_patch matrix > docs/compatibility.md"


def test_documented_pairs_are_the_ci_sessions():
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    rows = next(node.value for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MATRIX")
    ci = [(row.elts[0].value, row.elts[1].value) for row in rows.elts]
    assert ci == list(matrix.TESTED)


def test_old_transformers_gets_the_legacy_varlen_path_in_the_table():
    text = matrix.table()
    row = next(line for line in text.splitlines() if line.startswith("| 0.12.2 | 4.46.3 |"))
    assert "FlashAttention-2 classes hosting our varlen kernels" in row
