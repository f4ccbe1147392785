"""Slicer's own parameterNodeWrapper (read from a Slicer git repository at release tags)
finds a GUI connector for every widget the panel binds. Skipped unless
GVSL_SLICER_GIT_DIR names a Slicer git directory (a clone's .git or a bare mirror)
holding the tags; nothing is downloaded. Complements the table in test_slicer_packaging."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer")
REPO = Path(__file__).resolve().parents[1]
GIT_DIR = os.environ.get("GVSL_SLICER_GIT_DIR")
PACKAGE = "Base/Python/slicer/parameterNodeWrapper"
CHECK = Path(__file__).with_name("slicer_source") / "check_gui_connectors.py"
pytestmark = pytest.mark.skipif(not GIT_DIR, reason="set GVSL_SLICER_GIT_DIR to a Slicer git directory")


def git(*args):
    return subprocess.run(["git", "--git-dir", GIT_DIR, *args], capture_output=True, text=True, check=True).stdout


def slicer_package(tag, folder):
    """The parameterNodeWrapper package of Slicer ``tag``, written to ``folder``."""
    folder.mkdir(parents=True)
    for path in git("ls-tree", "--name-only", f"{tag}:{PACKAGE}").split():
        (folder / path).write_text(git("show", f"{tag}:{PACKAGE}/{path}"), encoding="utf-8")
    return folder


def run_check(package, *extra):
    return subprocess.run([sys.executable, str(CHECK), str(package), str(REPO), *extra], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})


@pytest.mark.parametrize("tag", ["v5.6.0", "v5.8.0", "v5.10.0"])
def test_every_bound_widget_gets_a_connector_from_slicers_own_code(tag, tmp_path):
    out = run_check(slicer_package(tag, tmp_path / "pnw"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GVSLPathLineEditToStrConnector" in out.stdout


def test_without_the_modules_own_connector_the_path_fields_fail(tmp_path):
    """Defect 1 of issue 10, reproduced with Slicer 5.6's code."""
    out = run_check(slicer_package("v5.6.0", tmp_path / "pnw"), "without-own-connector")
    assert out.returncode == 1
    assert out.stdout.count("FAIL") == 8 and "ctkPathLineEdit" in out.stdout
