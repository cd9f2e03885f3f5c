"""Regenerate ``unsloth_patch/data/chitchat_sample.jsonl`` from the ``chitchat-dataset`` package.

The sample gives the demo, tests and benchmarks real conversational text without
network access. It is deterministic: conversations are taken in the package's
file order with a fixed stride, so re-running this script reproduces the file
byte for byte (for the same package version).

Usage::

    pip install chitchat-dataset==0.9.0
    python scripts/make_chat_sample.py            # writes the shipped sample
    python scripts/make_chat_sample.py --check    # fails if the shipped file differs

Rules:
  * every ``STRIDE``-th conversation of ``dataset.json`` (file order), starting at 0;
  * utterances of one speaker's turn are joined with newlines, empty ones dropped,
    and consecutive turns of the same speaker merged, so roles alternate;
  * the first speaker is ``user``, the other ``assistant``;
  * at most ``MAX_TURNS`` turns, trimmed to end on an assistant turn (so the last
    turn can serve as a completion), and at least one user/assistant pair;
  * stop after ``NUM_CONVERSATIONS`` conversations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

STRIDE = 9
MAX_TURNS = 12
NUM_CONVERSATIONS = 400

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "unsloth_patch", "data", "chitchat_sample.jsonl")


def convert(conversation: dict, max_turns: int | None = MAX_TURNS) -> list[dict] | None:
    """Turn one chitchat conversation into TRL ``messages``, or None if too short."""
    turns: list[tuple[str, str]] = []  # (sender, text)
    for group in conversation["messages"]:
        texts = [u["text"].strip() for u in group if u.get("text") and u["text"].strip()]
        if not texts:
            continue
        sender = group[0]["sender"]
        text = "\n".join(texts)
        if turns and turns[-1][0] == sender:
            turns[-1] = (sender, turns[-1][1] + "\n" + text)
        else:
            turns.append((sender, text))
    turns = turns[:max_turns]
    if len(turns) % 2:
        turns = turns[:-1]
    if len(turns) < 2:
        return None
    first = turns[0][0]
    return [{"role": "user" if s == first else "assistant", "content": t} for s, t in turns]


def build_lines() -> list[str]:
    import chitchat_dataset  # only needed to regenerate

    data = chitchat_dataset.Dataset()  # dict: id -> conversation, in file order
    lines = []
    for conversation in list(data.values())[::STRIDE]:
        messages = convert(conversation)
        if messages is None:
            continue
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
        if len(lines) == NUM_CONVERSATIONS:
            break
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args(argv)
    text = "\n".join(build_lines()) + "\n"
    if args.check:
        with open(args.out, encoding="utf-8") as f:
            same = f.read() == text
        print("up to date" if same else f"{args.out} differs from a fresh build")
        return 0 if same else 1
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {text.count(chr(10))} conversations, {len(text.encode())} bytes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
