"""A function's source as a syntax tree, for the checks that recognise upstream code by its shape.

Several recognitions read a class's ``forward`` (the gated MLP's body, the attention call's keywords, what
a decoder layer does after its MLP). They all need the same thing first: the source, dedented and parsed,
or nothing when it cannot be read (a C function, a lambda, a file not shipped).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Optional


def parsed(function) -> Optional[ast.Module]:
    """The syntax tree of ``function``'s source, or None when the source cannot be read or parsed."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def definition(function) -> Optional[ast.FunctionDef]:
    """The ``def`` of ``function`` (its source's first statement), or None when there is none to read."""
    tree = parsed(function)
    first = tree.body[0] if tree is not None and tree.body else None
    return first if isinstance(first, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
