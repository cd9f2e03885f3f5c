"""Test unsloth_patch against a matrix of TRL releases.

One session per TRL release, each with pinned, known-good companions (``MATRIX``: the full
suite), plus one short ``smoke`` session for every other TRL minor line (``SMOKE_MATRIX``:
``pytest -m smoke`` only):

    python -m nox -l                          # list the sessions
    python -m nox                             # the whole matrix + kernels
    python -m nox -s tests-1.16.0             # one TRL release
    python -m nox -s tests-1.16.0-tf4.57.6    # TRL 1.16.0 on transformers 4.x
    python -m nox -t trl                      # every per-TRL session, no kernels
    python -m nox -s kernels                  # kernels + newest-only tests on the newest pins
    python -m nox -t smoke                    # every smoke session (pytest -m smoke), one per TRL minor line
    python -m nox -s smoke-0.14.0             # one smoke session
    python -m nox -s tests-0.13.0 -- -k lora  # extra pytest arguments after `--`

Environment variables (see docs/ci.md):

    UNSLOTH_PATCH_TORCH_SPEC       torch requirement, default ``torch==2.13.0``
    UNSLOTH_PATCH_TORCH_INDEX_URL  index for torch only; unset: a matching local
                                   wheel from pip's find-links, else the PyTorch
                                   CPU index; ``default``: the installer's own
                                   index configuration (e.g. a CUDA build)
    UNSLOTH_PATCH_ALLOW_ALL_SKIPPED=1  do not fail a session whose tests all skip
"""

from __future__ import annotations

import configparser
import glob
import os
import pathlib
import re
import shutil
import xml.etree.ElementTree as ET

import nox
from packaging.version import Version

# ---------------------------------------------------------------------------
# The matrix.  One row per session; every version is exact.
#
#   TRL        transformers  datasets  accelerate  peft      extra pins
MATRIX = [
    ("0.11.4", "4.57.6", "4.8.5", "1.15.0", "0.21.2", ("rich==15.0.0",)),
    ("0.12.2", "4.46.3", "4.8.5", "1.15.0", "0.17.1", ()),  # peft 0.21.2 + transformers 4.46: torch.distributed.tensor AttributeError
    ("0.13.0", "4.57.6", "4.8.5", "1.15.0", "0.21.2", ()),
    ("0.15.2", "4.57.6", "4.8.5", "1.15.0", "0.21.2", ()),
    ("0.19.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.21.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.24.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.29.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.0.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.8.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.16.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ("bitsandbytes==0.50.2",)),  # its CPU build: QLoRA tests
    ("1.16.0", "4.57.6", "4.8.5", "1.15.0", "0.21.2", ()),
]
# Smoke sessions: the newest release of every TRL minor line (0.11 to the newest) that has no
# row above runs `pytest -m smoke` (import order, report, padding-free loss parity). Same columns.
SMOKE_MATRIX = [
    ("0.14.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.16.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.17.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.18.2", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.20.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.22.2", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.23.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.25.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.26.2", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.27.2", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("0.28.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.1.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.2.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.3.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.4.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.5.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.6.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.7.1", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.9.2", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.10.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.11.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.12.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.13.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.14.2", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ()),
    ("1.15.0", "5.24.0", "5.2.0", "1.15.0", "0.21.2", ("triton==3.9.0",)),  # its SFTTrainer imports triton unguarded
]
# Installed in every session besides the row's pins.
COMMON = ("pytest==9.2.0", "wrapt==2.5.2", "packaging==26.4", "chitchat-dataset==0.9.0")
# The `kernels` session: the newest row plus triton.
KERNELS_EXTRA = ("triton==3.9.0",)
DEFAULT_TORCH_SPEC = "torch==2.13.0"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# ---------------------------------------------------------------------------

# The newest TRL on the newest transformers.
KERNELS_ROW = max(MATRIX, key=lambda r: (Version(r[0]), Version(r[1])))

ROOT = pathlib.Path(__file__).resolve().parent
REPORTS = ROOT / ".nox" / "_reports"

nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_venv = "no"
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


def _session_names(table: list[tuple] = MATRIX, prefix: str = "tests") -> list[tuple[str, tuple]]:
    seen: set[str] = set()
    out = []
    for row in table:
        trl = row[0]
        name = f"{prefix}-{trl}" if trl not in seen else f"{prefix}-{trl}-tf{row[1]}"
        seen.add(trl)
        out.append((name, row))
    return out


def _pins(row: tuple) -> list[str]:
    trl, tf, ds, acc, peft, extra = row
    return [
        f"trl=={trl}",
        f"transformers=={tf}",
        f"datasets=={ds}",
        f"accelerate=={acc}",
        f"peft=={peft}",
        *extra,
    ]


def _find_links() -> list[str]:
    """pip's find-links (env and config files), so that uv sees them too."""
    links: list[str] = []
    env = os.environ.get("PIP_FIND_LINKS", "")
    links += env.split()
    files = [
        "/etc/pip.conf",
        *[str(pathlib.Path(d) / "pip" / "pip.conf") for d in os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")],
        os.path.expanduser("~/.pip/pip.conf"),
        os.path.expanduser("~/.config/pip/pip.conf"),
        os.environ.get("PIP_CONFIG_FILE", ""),
    ]
    for f in files:
        if f and os.path.isfile(f):
            cp = configparser.ConfigParser()
            try:
                cp.read(f)
            except configparser.Error:
                continue
            for sec in ("global", "install"):
                if cp.has_option(sec, "find-links"):
                    links += cp.get(sec, "find-links").split()
    return list(dict.fromkeys(link for link in links if link))


def _local_torch_wheel(spec: str, links: list[str]) -> bool:
    m = re.fullmatch(r"torch\s*==\s*([0-9][0-9.]*)(\+\w+)?", spec.strip())
    if not m:
        return False
    ver, local = m.group(1), m.group(2) or ""
    for link in links:
        d = link[len("file://"):] if link.startswith("file://") else link
        if os.path.isdir(d):
            pattern = f"torch-{ver}{re.escape(local) if local else ''}*-cp311-*.whl"
            if glob.glob(os.path.join(d, pattern)):
                return True
    return False


def _install_torch(session: nox.Session, uv: bool) -> list[str]:
    """Install torch first, CPU build by default; returns args pinning it afterwards."""
    spec = os.environ.get("UNSLOTH_PATCH_TORCH_SPEC", DEFAULT_TORCH_SPEC)
    index = os.environ.get("UNSLOTH_PATCH_TORCH_INDEX_URL", "").strip()
    links = _find_links()
    args: list[str] = []
    if uv:
        for link in links:
            args += ["--find-links", link]
    if index == "default":
        pass
    elif index:
        args += ["--index-url", index]
    elif not _local_torch_wheel(spec, links):
        # Never fall through to PyPI's default torch (a multi-GB CUDA build):
        # the PyTorch CPU index also serves torch's own dependencies.
        args += ["--index-url", CPU_TORCH_INDEX]
    session.install(*args, spec)
    version = session.run(
        "python", "-c", "import importlib.metadata as m; print(m.version('torch'))", silent=True
    ).strip().splitlines()[-1]
    session.log(f"torch {version} installed")
    tmp = pathlib.Path(session.create_tmp())
    cons = tmp / "torch-constraint.txt"
    cons.write_text(f"torch=={version}\n")
    return ["-c", str(cons)]


def _install(session: nox.Session, pins: list[str]) -> None:
    uv = session.venv_backend == "uv"
    cons = _install_torch(session, uv)
    session.install(*cons, *pins, *COMMON)
    # The project's own dependency list (triton on Linux, ...) is not wanted here.
    session.install(*cons, "--no-deps", "-e", ".")
    session.run(
        "python",
        "-c",
        "import torch, trl, transformers, datasets, accelerate, peft;"
        "from trl import SFTTrainer, SFTConfig;"
        "print('torch', torch.__version__, '| trl', trl.__version__, '| transformers', transformers.__version__,"
        "'| datasets', datasets.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)",
    )


def _pytest(session: nox.Session, marker: str, env: dict | None = None) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = REPORTS / f"{session.name}.xml"
    if report.exists():
        report.unlink()
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        marker,
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
        "-o",
        f"junit_suite_name={session.name}",
        *session.posargs,
        env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})},
        success_codes=[0, 5],
    )
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.exists():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    ran = counts["tests"] - counts["skipped"]
    if counts["tests"] == 0:
        session.error(f"no tests were collected for `-m {marker}`: a session with no tests is a failure")
    if counts["failures"] or counts["errors"]:
        session.error(f"pytest reported {counts['failures']} failed and {counts['errors']} errors")
    if ran == 0 and os.environ.get("UNSLOTH_PATCH_ALLOW_ALL_SKIPPED") != "1":
        session.error(f"all {counts['tests']} tests were skipped: nothing was tested")


def _write_bytecode(session: nox.Session) -> None:
    """uv does not byte-compile; with PYTHONDONTWRITEBYTECODE set (as on some CI machines) every
    interpreter of the session would compile torch/transformers/TRL again (the import-order tests and
    the demo start fresh ones). Let the first import write the bytecode and the later ones reuse it."""
    session.env["PYTHONDONTWRITEBYTECODE"] = None


def _make_session(name: str, row: tuple, tag: str, marker: str) -> None:
    """One nox session: the row's pins, then ``pytest -m marker``."""
    pins = _pins(row)

    @nox.session(name=name, python=PYTHON, tags=[tag])
    def _session(session: nox.Session) -> None:
        _write_bytecode(session)
        _install(session, pins)
        _pytest(session, marker)

    _session.__doc__ = f"pytest -m '{marker}' with {', '.join(pins)}"


for _name, _row in _session_names():
    _make_session(_name, _row, "trl", "not kernels and not newest_only")
for _name, _row in _session_names(SMOKE_MATRIX, "smoke"):
    _make_session(_name, _row, "smoke", "smoke")


@nox.session(python=PYTHON, tags=["kernels"])
def kernels(session: nox.Session) -> None:
    """pytest -m 'kernels or newest_only' on the newest pins, with triton."""
    _write_bytecode(session)
    _install(session, _pins(KERNELS_ROW) + list(KERNELS_EXTRA))
    env = {}
    if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
        env["TRITON_INTERPRET"] = "1"  # no GPU: run the Triton kernels in the interpreter
    _pytest(session, "kernels or newest_only", env)
