"""Repository hygiene that protects users: the verl wheel installs top-level `tests` and
`scripts` packages, so this project must never import its own by those names."""

import os
import re
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = re.compile(r"^\s*(from|import)\s+(tests|scripts)(\.|\s|$)", re.MULTILINE)


def _python_files():
    for top in ("verl_mtp", "tests", "scripts", "recipes"):
        for dirpath, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_no_module_imports_tests_or_scripts_by_name():
    offenders = [p for p in _python_files() if FORBIDDEN.search(open(p, encoding="utf-8").read())]
    assert offenders == []


def test_pytest_collected_only_this_projects_tests(request):
    own_tests = os.path.join(REPO, "tests") + os.sep
    paths = {str(item.path) for item in request.session.items}
    assert paths, "nothing collected"
    assert all(p.startswith(own_tests) for p in paths), sorted(p for p in paths if not p.startswith(own_tests))


@pytest.mark.slow
def test_wheel_ships_only_the_verl_mtp_package(tmp_path):
    # `pip install verl-mtp` must not overwrite the verl wheel's top-level tests/ or scripts/.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("verl_mtp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names}
    assert {t for t in top_levels if not t.endswith(".dist-info")} == {"verl_mtp"}
    assert "verl_mtp/conf/ppo_megatron_mtp.yaml" in names  # the wrapper config is packaged
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points[0]).decode()
    assert "[verl.plugins]" in text and "verl_mtp = verl_mtp.plugin" in text
