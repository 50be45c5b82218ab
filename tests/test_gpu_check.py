"""scripts/gpu_check.py end to end in its CPU mode (``--device cpu --quick``).

The GPU check cannot run here (no GPU), so its Python part runs the same code on the CPU with tiny
sizes: verl's real bf16 engine (real_engine's CPU redirections instead of CUDA), every row of the
table it prints on a GPU. The test runs it as scripts/gpu_check.sh does, as a file in a fresh
process, and reads the printed table.
"""

import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.megatron

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
ROWS = (
    "forward (infer_batch) s",
    "forward: old log-probs finite",
    "rl+OCC update (train_mini_batch) s",
    "rl+OCC grad norm",
    "chunked vs unchunked MTP log-probs max abs diff",
    "on-policy delta_RL RMS per token",
    "off-policy delta_RL RMS per token",
    "step s, no MTP",
    "step s, standalone CE",
    "step s, rl+OCC",
    "step rl+OCC / standalone CE",
    "peak MiB, no MTP",
    "peak MiB, standalone CE",
    "peak MiB, rl+OCC",
    "peak rl+OCC / no MTP",
)


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def table(stdout: str) -> dict[str, float]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] != "check":
            rows[cells[0]] = float(cells[1])
    return rows


def test_cpu_quick_mode_prints_every_row_finite():
    result = run_script("--device", "cpu", "--quick")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table(result.stdout)
    assert list(rows) == list(ROWS), rows
    assert all(math.isfinite(v) for v in rows.values()), rows
    assert rows["forward: old log-probs finite"] == 1.0
    assert rows["rl+OCC grad norm"] > 0
    # same weights, chunked and unchunked: equal up to bf16 rounding of other GEMM shapes
    assert rows["chunked vs unchunked MTP log-probs max abs diff"] < 5e-2
    # the first mini-batch is on-policy (numerics only), the second follows an optimizer step
    assert rows["on-policy delta_RL RMS per token"] < rows["off-policy delta_RL RMS per token"]
    for name in ("no MTP", "standalone CE", "rl+OCC"):
        assert rows[f"step s, {name}"] > 0 and rows[f"peak MiB, {name}"] > 0
    # the MTP head's layer and optimizer state cost memory the no-MTP engine does not have
    assert rows["peak MiB, rl+OCC"] > rows["peak MiB, no MTP"]
    assert "all finite" in result.stdout


def test_bad_sizes_are_refused_before_anything_is_built():
    result = run_script("--device", "cpu", "--quick", "--batch", "3")
    assert result.returncode == 2
    assert "--batch=3" in result.stderr and "two mini-batches" in result.stderr
