"""HF <-> megatron-core conversion of the MTP head through verl-mtp's mbridge bridges, on CPU.

Each test writes a tiny random checkpoint in the family's real Hugging Face layout
(``verl_mtp.testing.tiny_hf``, written independently of the bridges), loads it through mbridge
into a real megatron-core GPTModel with MTP and exports it back. DeepSeek-V3 runs MLA + MoE
(megatron's local MLA core attention replaced by ``CpuLatentCoreAttention``, which CPU needs);
the Qwen3.5 / Qwen3-Next case uses Qwen MTP names on an ordinary Qwen3 attention trunk, because
megatron-core cannot build the gated-delta-net trunk on CPU.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mbridge")

from verl_mtp.local_megatron.hf_model import export_hf_weights, load_hf_model  # noqa: E402
from verl_mtp.models.bridges import bridge_classes  # noqa: E402
from verl_mtp.models.mtp_bridge import swap_halves  # noqa: E402
from verl_mtp.models.export_check import (  # noqa: E402
    IncompleteMtpExportError,
    check_saved_hf_dir,
    checked_export,
)
from verl_mtp.local_megatron.single_process import cpu_megatron  # noqa: E402
from verl_mtp.testing.tiny_hf import write_tiny_checkpoint  # noqa: E402

CASES = {"mimo": 1, "deepseek_v3": 2, "glm4_moe": 2, "qwen_mtp": 1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (path, source tensors, loaded model, exported tensors); built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            path = str(tmp_path_factory.mktemp(family))
            source = write_tiny_checkpoint(path, family, CASES[family], seed=7)
            loaded = load_hf_model(path)
            cache[family] = (path, source, loaded, export_hf_weights(loaded))
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(CASES))
def test_round_trip_is_bit_exact_for_every_tensor(checkpoints, family):
    _, source, loaded, exported = checkpoints(family)
    naming = loaded.family.naming(loaded.hf_config, CASES[family], source)
    assert sorted(exported) == sorted(source)
    different = [n for n in source if not torch.equal(source[n], exported[n])]
    assert different == []
    mtp = [n for n in exported if naming.is_mtp(n)]
    # Every depth the checkpoint declares came back, with all core tensors.
    assert {naming.depth_of(n) for n in mtp} - {None} == set(range(CASES[family]))
    assert all(naming.name(k) in exported for k in naming.required_keys())
    assert loaded.model.config.mtp_num_layers == CASES[family]


def test_a_bf16_load_is_uniformly_bf16_and_round_trips_the_bf16_values(tmp_path):
    # megatron's local-spec norms are built in fp32; a half-precision load must not keep them so
    # (mixed dtypes made rms_norm warn on GPU and compute the norms in fp32).
    source = write_tiny_checkpoint(str(tmp_path), "mimo", 1, seed=3)
    loaded = load_hf_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    exported = export_hf_weights(loaded)
    assert sorted(exported) == sorted(source)
    assert [n for n in source if not torch.equal(source[n].to(torch.bfloat16), exported[n].to(torch.bfloat16))] == []


def test_deepseek_v3_trunk_copies_are_ignored_on_import_and_written_from_the_trunk(checkpoints, tmp_path):
    path, source, loaded, _ = checkpoints("deepseek_v3")
    trunk_layers = loaded.hf_config["num_hidden_layers"]
    # Poison the per-depth copies in a second checkpoint: the import must not read them ...
    poisoned = dict(source)
    for depth in range(CASES["deepseek_v3"]):
        poisoned[f"model.layers.{trunk_layers + depth}.embed_tokens.weight"] = torch.zeros(64, 32)
    from verl_mtp.testing.tiny_hf import write_checkpoint

    write_checkpoint(str(tmp_path), loaded.hf_config, poisoned)
    exported = export_hf_weights(load_hf_model(str(tmp_path)))
    # ... and the export writes them from the model's embedding / output layer.
    for depth in range(CASES["deepseek_v3"]):
        layer = f"model.layers.{trunk_layers + depth}"
        assert torch.equal(exported[f"{layer}.embed_tokens.weight"], source["model.embed_tokens.weight"])
        assert torch.equal(exported[f"{layer}.shared_head.head.weight"], source["lm_head.weight"])


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_mimo_input_proj_halves_are_swapped_the_right_way(checkpoints):
    """megatron's MTP projection on the loaded model equals MiMo's own computation
    input_proj([hidden_layernorm(h), token_layernorm(e)]); loading input_proj unswapped (stock
    mbridge) does not."""
    _, source, loaded, _ = checkpoints("mimo")
    layer = loaded.model.mtp.layers[0]
    eps = loaded.hf_config["rms_norm_eps"]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 2, 32, generator=g)  # [seq, batch, hidden]
    embedding = torch.randn(5, 2, 32, generator=g)
    p = "model.mtp_layers.0."
    by_hand = torch.cat(
        [_rms_norm(hidden, source[p + "hidden_layernorm.weight"], eps),
         _rms_norm(embedding, source[p + "token_layernorm.weight"], eps)], dim=-1
    ) @ source[p + "input_proj.weight"].T
    with torch.no_grad(), cpu_megatron():
        ours = layer._concat_embeddings(hidden, embedding)
        torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)
        # The stock mapping (no swap) multiplies the embedding with the hidden-state half.
        swapped = layer.eh_proj.weight.detach().clone()
        layer.eh_proj.weight.copy_(source[p + "input_proj.weight"])
        try:
            stock = layer._concat_embeddings(hidden, embedding)
        finally:
            layer.eh_proj.weight.copy_(swapped)
    assert not torch.allclose(stock, by_hand, atol=1e-3)
    assert torch.equal(swap_halves(swap_halves(source[p + "input_proj.weight"])), source[p + "input_proj.weight"])


@pytest.mark.parametrize("family,dropped", [
    ("mimo", "model.mtp_layers.0.input_proj.weight"),
    ("deepseek_v3", "model.layers.3.mlp.experts.2.up_proj.weight"),
    ("glm4_moe", "model.layers.2.shared_head.norm.weight"),
    ("qwen_mtp", "mtp.fc.weight"),
])
def test_completeness_check_names_a_dropped_mtp_tensor(checkpoints, family, dropped):
    _, _, loaded, _ = checkpoints(family)
    with cpu_megatron():
        stream = (item for item in loaded.bridge.export_weights([loaded.model]) if item[0] != dropped)
        with pytest.raises(IncompleteMtpExportError, match=dropped.replace(".", r"\.")):
            for _ in checked_export(stream, [loaded.model], loaded.bridge, loaded.hf_config):
                pass


def test_structural_check_without_a_name_table_names_the_depth_that_lost_a_tensor(checkpoints):
    """Megatron-Bridge has no ``expected_mtp_hf_names``: the check compares depths instead."""
    _, _, loaded, exported = checkpoints("deepseek_v3")
    dropped = "model.layers.3.self_attn.kv_b_proj.weight"  # depth 1 of 2
    stream = ((n, t) for n, t in exported.items() if n != dropped)
    no_table = SimpleNamespace()  # a bridge that cannot name HF tensors
    with pytest.raises(IncompleteMtpExportError, match=r"depth 1 .*kv_b_proj"):
        list(checked_export(stream, [loaded.model], no_table, loaded.hf_config))
    # An extra depth the model does not have is refused too.
    extra = dict(exported)
    extra["model.layers.4.enorm.weight"] = torch.ones(32)
    with pytest.raises(IncompleteMtpExportError, match=r"depths exported: \[0, 1, 2\]"):
        list(checked_export(iter(extra.items()), [loaded.model], no_table, loaded.hf_config))


def test_registration_gives_verl_vanilla_mbridge_the_corrected_bridges():
    from mbridge.core.bridge import _MODEL_REGISTRY

    import verl.models.mcore.mbridge  # noqa: F401 - the module verl's vanilla_mbridge path imports
    from verl_mtp.patches.catalog import MTP_COMPLETE_EXPORT

    assert MTP_COMPLETE_EXPORT.applied
    ours = bridge_classes()
    assert {t: _MODEL_REGISTRY[t] for t in ("mimo", "deepseek_v3", "glm4_moe")} == {
        "mimo": ours["mimo"], "deepseek_v3": ours["deepseek_v3"], "glm4_moe": ours["glm4_moe"]}
    MTP_COMPLETE_EXPORT.undo()
    try:
        assert _MODEL_REGISTRY["mimo"].__module__ == "mbridge.models.mimo"
        assert _MODEL_REGISTRY["glm4_moe"].__module__ == "mbridge.models.glm4moe"
    finally:
        MTP_COMPLETE_EXPORT.apply()
    assert _MODEL_REGISTRY["mimo"] is ours["mimo"]


def _manager(loaded):
    """verl's MegatronCheckpointManager with just what its HF save path reads (no optimizer)."""
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    manager = MegatronCheckpointManager.__new__(MegatronCheckpointManager)
    manager.model = [loaded.model]
    manager.bridge = loaded.bridge
    manager.hf_config = loaded.bridge.hf_config
    manager.vanilla_bridge = True
    manager.peft_cls = None
    manager.checkpoint_config = SimpleNamespace(mbridge_config=None)
    return manager


def test_hf_checkpoint_save_keeps_mtp_and_config_declares_the_model_depths(tmp_path):
    """mtp.mtp_num_layers=1 on a 2-depth checkpoint: verl's HF config object still says 2, and
    mbridge would skip every shard holding a depth-1 tensor; the saved directory must hold the
    model's one depth completely and config.json must say 1."""
    source_dir = tmp_path / "source"
    source = write_tiny_checkpoint(str(source_dir), "glm4_moe", 2, seed=11)
    loaded = load_hf_model(str(source_dir), mtp_num_layers=1)
    out = tmp_path / "model" / "huggingface"
    with cpu_megatron():
        _manager(loaded)._save_model_as_hf_via_bridge(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    from verl_mtp.models.export_check import stored_tensor_names

    saved = set(stored_tensor_names(str(out)))
    expected = {n for n in source if not n.startswith("model.layers.3.")}
    assert saved == expected
    check_saved_hf_dir(str(out), [loaded.model], loaded.bridge, config)


def test_saved_dir_check_refuses_an_index_that_lists_unwritten_shards(checkpoints, tmp_path):
    path, _, loaded, _ = checkpoints("mimo")
    import shutil

    shutil.copytree(path, tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.mtp_layers.0.final_layernorm.weight"]
    os.remove(tmp_path / "copy" / victim)
    with pytest.raises(IncompleteMtpExportError, match="final_layernorm"):
        check_saved_hf_dir(str(tmp_path / "copy"), [loaded.model], loaded.bridge, loaded.hf_config)


def test_qwen_names_refuse_a_second_depth_with_a_clear_error():
    from verl_mtp.models.mtp_bridge import qwen_mtp_hf_names

    def trunk(layer, rest):
        return [f"model.layers.{layer}.self_attn.o_proj.weight"]

    assert qwen_mtp_hf_names(0, "eh_proj.weight", trunk) == ["mtp.fc.weight"]
    assert qwen_mtp_hf_names(0, "mtp_model_layer.self_attention.linear_proj.weight", trunk) == [
        "mtp.layers.0.self_attn.o_proj.weight"]
    with pytest.raises(ValueError, match="only MTP depth 0"):
        qwen_mtp_hf_names(1, "eh_proj.weight", trunk)


def test_rollout_weight_stream_is_checked_when_exhausted(checkpoints, monkeypatch):
    """verl's MegatronEngine.get_per_tensor_param (vanilla mbridge path, patched) on a stand-in
    engine object: the stream verl hands the rollout engine passes complete and fails, naming
    the tensor, when the bridge drops an MTP tensor. The stand-in replaces the CUDA engine; the
    GPU reload helper is made a no-op (there is no GPU here)."""
    from verl.workers.engine.megatron import transformer_impl

    _, source, loaded, _ = checkpoints("deepseek_v3")
    assert hasattr(transformer_impl.MegatronEngine.get_per_tensor_param, "__verl_mtp_original__")
    monkeypatch.setattr(transformer_impl, "load_megatron_model_to_gpu", lambda *a, **k: None)
    engine = SimpleNamespace(
        peft_cls=None, _qat_enabled=False, vanilla_bridge=True, bridge=loaded.bridge, module=[loaded.model],
        model_config=SimpleNamespace(lora={}, hf_config=loaded.bridge.hf_config),
    )
    with cpu_megatron():
        stream, _ = transformer_impl.MegatronEngine.get_per_tensor_param(engine, base_sync_done=False)
        assert sorted(n for n, _ in stream) == sorted(source)

        dropped = "model.layers.2.shared_head.norm.weight"
        full_export = loaded.bridge.export_weights
        monkeypatch.setattr(loaded.bridge, "export_weights",
                            lambda models: ((n, t) for n, t in full_export(models) if n != dropped))
        stream, _ = transformer_impl.MegatronEngine.get_per_tensor_param(engine, base_sync_done=False)
        with pytest.raises(IncompleteMtpExportError, match=r"weight sync.*shared_head\.norm"):
            for _ in stream:
                pass


def test_deepseek_v3_at_full_trunk_depth_writes_each_copy_once():
    """With the real trunk depth (61) and one MTP depth the stock bridge's own copy table applies;
    the copies must still come out once each (no duplicate names)."""
    from transformers import AutoConfig

    from verl_mtp.testing.tiny_hf import tiny_config
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    config = tiny_config("deepseek_v3", 1, num_hidden_layers=61)
    hf = AutoConfig.for_model("deepseek_v3", **{k: v for k, v in config.items() if k != "model_type"})
    bridge = bridge_classes()["deepseek_v3"](hf, dtype=torch.float32)
    names, tensors = bridge._weight_to_hf_format("embedding.word_embeddings.weight", torch.zeros(64, 32))
    assert names == ["model.embed_tokens.weight", "model.layers.61.embed_tokens.weight"]
    names, _ = bridge._weight_to_hf_format("output_layer.weight", torch.zeros(64, 32))
    assert names == ["lm_head.weight", "model.layers.61.shared_head.head.weight"]
    assert bridge._weight_name_mapping_mcore_to_hf("mtp.layers.0.eh_proj.weight") == ["model.layers.61.eh_proj.weight"]


def test_expected_names_cover_every_expert_parallel_rank(checkpoints, monkeypatch):
    """With EP=2 a rank holds local experts 0..1 of 4; the export gathers all four, so the
    expected MTP names must name all four."""
    import re

    _, _, loaded, exported = checkpoints("deepseek_v3")
    bridge = loaded.bridge
    names = [n for n in loaded.model.state_dict() if "_extra_state" not in n]
    full = sorted(bridge.expected_mtp_hf_names(names))
    rank_local = [n for n in names if not re.search(r"local_experts\.[23]\.", n)]
    monkeypatch.setattr(bridge, "mpu", SimpleNamespace(**{**vars(bridge.mpu), "ep_size": 2}))
    assert sorted(set(bridge.expected_mtp_hf_names(rank_local))) == full
    assert "model.layers.3.mlp.experts.3.down_proj.weight" in full


def test_what_verl_does_to_the_hf_depth_count():
    """verl's own check_mtp_config keeps the HF depth count with mtp.enable=True and zeroes it
    with mtp.enable=False (so an export then declares no MTP, matching a model without MTP)."""
    from transformers import AutoConfig

    import verl.utils.megatron_utils as megatron_utils
    from verl_mtp.testing.tiny_hf import tiny_config

    stock = getattr(megatron_utils.check_mtp_config, "__verl_mtp_original__", megatron_utils.check_mtp_config)
    for enable, expected in ((True, 2), (False, 0)):
        config = tiny_config("glm4_moe", 2)
        hf = AutoConfig.for_model("glm4_moe", **{k: v for k, v in config.items() if k != "model_type"})
        model_config = SimpleNamespace(hf_config=hf, mtp=SimpleNamespace(enable=enable, mtp_loss_scaling_factor=0.1))
        engine_config = SimpleNamespace(override_transformer_config={})
        stock(model_config, engine_config)
        assert hf.num_nextn_predict_layers == expected


def test_the_stock_mbridge_defects_this_module_corrects():
    """Pins what mbridge 0.15.1 itself does, so a fixed mbridge shows up here (then the
    overrides in verl_mtp.models.bridges can be revisited)."""
    from mbridge.models.deepseek_v3 import DeepseekV3Bridge
    from mbridge.models.glm4moe import GLM4MoEBridge
    from mbridge.models.mimo import MimoBridge

    from verl_mtp.models.bridges import hf_config_object as _hf_config_object
    from verl_mtp.testing.tiny_hf import tiny_config, write_checkpoint
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    w = torch.arange(8.0).reshape(2, 4)

    def stock(cls, family, depths, tmp):
        config = tiny_config(family, depths)
        write_checkpoint(tmp, config, {})
        return cls(_hf_config_object(tmp, config), dtype=torch.float32)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mimo = stock(MimoBridge, "mimo", 1, tmp + "/m")
        # eh_proj loaded from input_proj unchanged: no half swap.
        assert torch.equal(mimo._weight_to_mcore_format("mtp.layers.0.eh_proj.weight", [w]), w)
        glm = stock(GLM4MoEBridge, "glm4_moe", 2, tmp + "/g")
        # no MTP depths declared, and depth 1's norm lands on depth 0's layer (L = 2)
        assert glm.config.mtp_num_layers is None
        assert glm._weight_name_mapping_mtp("mtp.layers.1.enorm.weight", 2) == ["model.layers.2.enorm.weight"]
        ours = bridge_classes()["glm4_moe"](_hf_config_object(tmp + "/g", tiny_config("glm4_moe", 2)), dtype=torch.float32)
        assert ours._weight_name_mapping_mcore_to_hf("mtp.layers.1.enorm.weight") == ["model.layers.3.enorm.weight"]
    # DeepSeek-V3: one MTP depth on a 61-layer trunk only.
    two_depths = SimpleNamespace(config=SimpleNamespace(mtp_num_layers=2, num_layers=61))
    with pytest.raises(AssertionError, match="one mtp layer"):
        DeepseekV3Bridge._convert_mtp_param(two_depths, "mtp.layers.1.enorm.weight")
    short_trunk = SimpleNamespace(config=SimpleNamespace(mtp_num_layers=1, num_layers=2))
    with pytest.raises(AssertionError, match="61 layers"):
        DeepseekV3Bridge._convert_mtp_param(short_trunk, "mtp.layers.0.enorm.weight")
