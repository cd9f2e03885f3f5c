"""A cold benchmark row starts from empty compilation caches, every one a process can fill.

On 2026-12-07 a second Unsloth process of one benchmark call read the first one's torch.compile artifacts
(Unsloth's persisted "mega cache" and torch's Inductor cache, both outside Triton's cache, the only one the
driver used to empty) and ran 2.6x faster whole-run. Each cold row now gets its own empty directory for each
cache; a warm row reuses its cold row's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import sft  # noqa: E402

RESULT = {"tokens_per_s_whole": 1.0, "tokens_per_s_steady": 1.0, "tokens_per_s_steady_steps": 1.0,
          "tokens_per_s_train_runtime": 1.0, "startup_s": 0.0, "peak_gib": 1.0, "final_loss": 1.0}


def _drive(tmp_path, monkeypatch, configs: str, warm: bool) -> list:
    """``sft.py all`` with each configuration's process replaced by one that records its environment."""
    seen = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def fake_run(cmd, capture_output, text, env):
        target = pathlib.Path(cmd[cmd.index("--out") + 1])
        seen.append((cmd[cmd.index("--config") + 1], cmd[cmd.index("--phase") + 1],
                     {var: env.get(var) for var in sft.CACHE_DIRS}))
        target.write_text(json.dumps(RESULT))
        return Done()

    monkeypatch.setattr(sft.subprocess, "run", fake_run)
    monkeypatch.setattr(sft.tempfile, "tempdir", str(tmp_path))  # the cache directories land in the test's own
    monkeypatch.setattr(sft, "report", lambda *args, **kwargs: "")
    parser_defaults = dict(out=str(tmp_path), configs=configs, warm=warm, repeat=1, first_repeat=1, model="llama",
                           data="d", min_tokens=1, batch_size=1, max_length=8, model_dir="m", tag="", launch=None,
                           nproc=1, peer_path="", patch_path="")
    sft.run_all(argparse.Namespace(**parser_defaults))
    return seen


def test_every_cold_row_gets_empty_caches_of_its_own_and_its_warm_row_reuses_them(tmp_path, monkeypatch):
    seen = _drive(tmp_path, monkeypatch, "unsloth,unsloth_patch", warm=True)
    assert [(name, phase) for name, phase, _ in seen] == [("unsloth", "cold"), ("unsloth", "warm"),
                                                          ("unsloth_patch", "cold"), ("unsloth_patch", "warm")]
    assert set(sft.CACHE_DIRS) == {"TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_MEGA_CACHE_DIR"}
    colds = [dirs for _, phase, dirs in seen if phase == "cold"]
    for dirs in colds:
        for var, path in dirs.items():
            assert path and os.path.isdir(path) and not os.listdir(path), (var, path)
    all_cold = [path for dirs in colds for path in dirs.values()]
    assert len(set(all_cold)) == len(all_cold)  # no two cold rows, and no two caches, share a directory
    assert seen[1][2] == seen[0][2] and seen[3][2] == seen[2][2]  # warm: the caches its cold row filled


def test_a_repeated_configuration_starts_cold_again(tmp_path, monkeypatch):
    """Two cold rows of the same configuration in one call (the 10 GiB repeats) do not share a cache."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _drive(tmp_path / "a", monkeypatch, "unsloth", warm=False)
    second = _drive(tmp_path / "b", monkeypatch, "unsloth", warm=False)
    assert first[0][2]["UNSLOTH_MEGA_CACHE_DIR"] != second[0][2]["UNSLOTH_MEGA_CACHE_DIR"]
