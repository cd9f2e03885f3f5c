"""Small real chat corpus shipped with the package.

A deterministic sample of the MIT-licensed ``chitchat-dataset`` in TRL's
conversational format, so demos, tests and benchmarks train on real text
without network access. Regenerate with ``scripts/make_chat_sample.py``.
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["load_chat_sample", "SAMPLE_FILE", "SAMPLE_LICENSE"]

_PKG = __name__
SAMPLE_FILE = resources.files(_PKG) / "chitchat_sample.jsonl"
SAMPLE_LICENSE = resources.files(_PKG) / "LICENSE-chitchat-dataset.txt"


def load_chat_sample(limit: int | None = None) -> list[dict]:
    """Return up to ``limit`` conversations as ``{"messages": [...]}`` dicts.

    Pure Python (no ``datasets`` import) so it is cheap to call from anywhere.
    """
    rows: list[dict] = []
    with SAMPLE_FILE.open("r", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
