"""With the plugin active and no mtp.* key set, verl behaves as without it.

Runs the CPU config/algorithm tests the verl wheel ships (its top-level `tests` package) in a
fresh interpreter, where `import verl` loads verl-mtp through the entry point.
"""

import os
import subprocess
import sys

import pytest

VERL_CPU_TESTS = [
    "test_base_config_on_cpu.py",
    "trainer/ppo/test_core_algos_on_cpu.py",
    "trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
    "trainer/ppo/test_loss_aggregation_on_cpu.py",
    "trainer/ppo/test_spec_decode_metrics_on_cpu.py",
    "experimental/fully_async_policy/test_async_genrm_config_on_cpu.py",
]


def _verl_tests_dir():
    # The verl wheel's own test package; located without importing it under the name `tests`.
    import verl

    site = os.path.dirname(os.path.dirname(verl.__file__))
    path = os.path.join(site, "tests")
    return path if os.path.isfile(os.path.join(path, "test_base_config_on_cpu.py")) else None


@pytest.mark.slow
def test_verl_shipped_cpu_tests_pass_with_plugin_active(tmp_path):
    tests_dir = _verl_tests_dir()
    if tests_dir is None:
        pytest.skip("this verl install ships no tests package")
    files = [os.path.join(tests_dir, f) for f in VERL_CPU_TESTS if os.path.isfile(os.path.join(tests_dir, f))]
    assert len(files) >= 4, files
    # A conftest in a neutral rootdir asserts the plugin really is active in that process.
    (tmp_path / "conftest.py").write_text(
        "import sys, verl\n"
        "assert 'verl_mtp.plugin' in sys.modules, 'verl-mtp plugin not loaded'\n"
        "from verl.workers.config import MtpConfig\n"
        "assert MtpConfig.__module__ == 'verl_mtp.config'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "-c", os.devnull, "--confcutdir", str(tmp_path), "-x", *files],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=900,
        env={k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"},
    )
    tail = "\n".join(proc.stdout.splitlines()[-15:])
    assert proc.returncode == 0, tail + proc.stderr[-3000:]
    assert " passed" in tail and " failed" not in tail
