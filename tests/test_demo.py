"""The stock-vs-patched demo runs end to end and prints comparable numbers for both runs."""

import re

import pytest

from unsloth_patch import demo


@pytest.mark.newest_only  # version-specific paths of the demo script were checked by hand (see docs/ci.md)
def test_demo_prints_both_runs(capsys):
    import glob
    import tempfile

    before = set(glob.glob(f"{tempfile.gettempdir()}/unsloth_patch_demo_*"))
    rc = demo.main(
        ["--steps", "3", "--batch-size", "4", "--max-length", "128", "--hidden-size", "64", "--num-layers", "2",
         "--quiet-script"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[stock]" in out and "[patched]" in out
    assert "training script (identical for both runs)" in out
    speeds = re.findall(r"tokens/s: ([\d,]+)", out)
    finals = re.findall(r"final loss: (\d+\.\d+)", out)
    assert len(speeds) == 2 and all(float(s.replace(",", "")) > 0 for s in speeds), out
    assert len(finals) == 2 and all(0 < float(x) < 10 for x in finals), out
    assert len(re.findall(r"loss per logged step: 1:\d+\.\d+", out)) == 2, out
    assert "peak memory:" in out and "patched vs stock:" in out
    # the patched run either reports the plugin active or says clearly that it is not
    assert "plugin: imported" in out or "plugin: NOT ACTIVE" in out
    assert set(glob.glob(f"{tempfile.gettempdir()}/unsloth_patch_demo_*")) == before  # cleaned up after itself
    if "(GPU" not in out:  # on a CPU the plugin keeps stock's path: the very same losses
        assert finals[0] == finals[1], out
        assert "padding-free: padded batches kept: no varlen attention kernel here (cpu" in out


@pytest.mark.newest_only
def test_demo_writes_its_training_output_inside_its_working_directory(tmp_path):
    import os

    assert demo.main(["--steps", "1", "--batch-size", "2", "--max-length", "32", "--hidden-size", "32",
                      "--num-layers", "1", "--quiet-script", "--workdir", str(tmp_path)]) == 0
    assert os.path.isdir(tmp_path / "out")
    assert 'output_dir="out"' in (tmp_path / "train.py").read_text()
