"""Put TRL's own SFT tests where run.sh runs them: ``python prepare.py GIT_DIR TAG WORK``.

GIT_DIR is a bare mirror of huggingface/trl (e.g. from the tool library's ``fetch``), TAG the
release whose ``tests/`` to take. Where the installed TRL is newer than TAG, the tests import a few
private names it no longer has; their import is made optional in the scratch copy (the tests that
use them are deselected by ``offline_hub.py``). Nothing here is committed to the project.
"""

import pathlib
import subprocess
import sys


def main(git_dir: str, tag: str, work: str) -> None:
    src = pathlib.Path(work) / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", tag, "tests"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    tests = src / "tests" / "test_sft_trainer.py"
    text = tests.read_text()
    names = ("_chunked_cross_entropy_loss", "_patch_chunked_ce_lm_head", "dft_loss")
    block = ("from trl.trainer.sft_trainer import (\n    DataCollatorForLanguageModeling,\n"
             + "".join(f"    {n},\n" for n in names) + ")\n")
    if block in text:
        text = text.replace(block, "from trl.trainer.sft_trainer import DataCollatorForLanguageModeling\n"
                            "try:  # names the installed TRL may lack\n"
                            f"    from trl.trainer.sft_trainer import {', '.join(names)}\n"
                            "except ImportError:\n"
                            f"    {' = '.join(names)} = None\n")
        tests.write_text(text)
    utils = src / "tests" / "testing_utils.py"
    text = utils.read_text()
    if "    is_joblib_available,\n" in text:
        text = text.replace("    is_joblib_available,\n", "", 1)
        text = ("try:  # absent from newer TRL\n    from trl.import_utils import is_joblib_available\n"
                "except ImportError:\n    def is_joblib_available():\n        import importlib.util\n"
                "        return importlib.util.find_spec('joblib') is not None\n\n") + text
        utils.write_text(text)
    print(f"tests of {tag} in {src}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
