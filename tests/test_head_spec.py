"""The MTP head layout of ``verl_mtp.models.head_spec`` against the installed transformers' own
modelling code: the decoder layer each family's MTP depth wraps is built by transformers from the
same config, and its parameter names and shapes must be the spec's (the MTP-only fusion tensors
come from no transformers module and are checked in tests/test_ckpt_tools.py)."""

import pytest

from verl_mtp.models.families import detect_family, mtp_depths, text_config
from verl_mtp.models.head_spec import head_spec
from verl_mtp.testing.tiny_hf import tiny_config

transformers = pytest.importorskip("transformers")

# Tensors of an MTP depth that are not part of its decoder layer.
FUSION = {
    "mimo": ("token_layernorm.", "hidden_layernorm.", "input_proj.", "final_layernorm."),
    "deepseek_v3": ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens."),
    "glm4_moe": ("enorm.", "hnorm.", "eh_proj.", "shared_head.", "embed_tokens."),
    "qwen3_next": (),
    "qwen3_5": (),
}


def _layer(tiny: str, config: dict):
    """transformers' decoder layer of the first MTP depth of ``config``."""
    cfg = text_config(config)
    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type") and not k.startswith("_")}
    trunk = cfg["num_hidden_layers"]
    if tiny == "mimo":  # MiMo's MTP block is a Qwen2 decoder layer
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Config, Qwen2DecoderLayer

        return Qwen2DecoderLayer(Qwen2Config(**kwargs), 0)
    if tiny == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3DecoderLayer

        return DeepseekV3DecoderLayer(DeepseekV3Config(**kwargs), trunk)
    if tiny == "glm4_moe":
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeConfig, Glm4MoeDecoderLayer

        return Glm4MoeDecoderLayer(Glm4MoeConfig(**kwargs), trunk)
    # Qwen: the MTP layer is a full-attention decoder layer whose index is its depth.
    kwargs["layer_types"] = ["full_attention"] * trunk
    if tiny == "qwen3_next":
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextConfig, Qwen3NextDecoderLayer

        return Qwen3NextDecoderLayer(Qwen3NextConfig(**kwargs), 0)
    if tiny == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer, Qwen3_5MoeTextConfig

        return Qwen3_5MoeDecoderLayer(Qwen3_5MoeTextConfig(**kwargs), 0)
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5TextConfig

    return Qwen3_5DecoderLayer(Qwen3_5TextConfig(**kwargs), 0)


def _checkpoint_names(state: dict) -> dict:
    """transformers keeps routed experts fused in memory ([E, 2I, h] / [E, h, I]); checkpoints of
    these families store one tensor per expert (transformers converts on load)."""
    out = {}
    for name, shape in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            experts, two_inter, hidden = shape
            for e in range(experts):
                out[f"mlp.experts.{e}.gate_proj.weight"] = (two_inter // 2, hidden)
                out[f"mlp.experts.{e}.up_proj.weight"] = (two_inter // 2, hidden)
        elif name.endswith("mlp.experts.down_proj"):
            experts, hidden, inter = shape
            for e in range(experts):
                out[f"mlp.experts.{e}.down_proj.weight"] = (hidden, inter)
        else:
            out[name] = shape
    return out


CASES = [
    ("mimo", {}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"q_lora_rank": None, "n_shared_experts": 2}),
    ("deepseek_v3", {"first_k_dense_replace": 5}),  # the MTP layer index 2 is dense
    ("glm4_moe", {}),
    ("glm4_moe", {"use_qk_norm": True, "attention_bias": False}),
    ("qwen3_next", {}),
    ("qwen3_next", {"decoder_sparse_step": 2}),  # the MTP layer (index 0) is dense
    ("qwen3_5", {}),
    ("qwen3_5_moe", {}),
]


@pytest.mark.parametrize("tiny,overrides", CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_spec_layer_is_transformers_decoder_layer(tiny, overrides):
    config = tiny_config(tiny, 1, **overrides)
    family = detect_family(config)
    spec = head_spec(family, config, mtp_depths(config))
    assert spec.derivable, spec.problems
    layer = {rest: e.shape for rest, e in spec.per_depth[0].items() if not rest.startswith(FUSION[family.name])}
    for group in spec.variants[0]:
        layer.update({rest: e.shape for rest, e in group[0][1].items()})  # one tensor per expert
    hf = _checkpoint_names({n: tuple(t.shape) for n, t in _layer(tiny, config).state_dict().items()})
    assert layer == hf


@pytest.mark.parametrize("tiny", ["qwen3_next", "qwen3_5_moe"])
def test_fused_expert_layout_is_transformers_in_memory_one(tiny):
    config = tiny_config(tiny, 1)
    spec = head_spec(detect_family(config), config, 1)
    [(_, per_expert), (label, fused)] = spec.variants[0][0]
    state = {n: tuple(t.shape) for n, t in _layer(tiny, config).state_dict().items()}
    assert label == "fused experts"
    assert {n: e.shape for n, e in fused.items()} == {n: s for n, s in state.items() if ".experts." in n}


# --- the export check without a bridge's name table uses the same layout ------------------------


def _export(tiny, depths=1, **overrides):
    from verl_mtp.testing.tiny_hf import hf_tensor_shapes

    config = tiny_config(tiny, depths, **overrides)
    family = detect_family(config)
    names = sorted(hf_tensor_shapes(config))
    return config, family.naming(config, depths, names), names


@pytest.mark.parametrize("tiny,dropped", [
    ("deepseek_v3", "model.layers.2.self_attn.kv_b_proj.weight"),
    ("glm4_moe", "model.layers.2.mlp.experts.3.down_proj.weight"),
    ("mimo", "model.mtp_layers.0.self_attn.v_proj.bias"),
    ("qwen3_next", "mtp.layers.0.mlp.shared_expert_gate.weight"),
])
def test_structural_export_check_names_a_tensor_the_config_head_has(tiny, dropped):
    """One depth, so no other depth to compare with; the tensor is no core one: only the whole-head
    layout catches it."""
    from verl_mtp.models.export_check import IncompleteMtpExportError, check_mtp_export

    config, naming, names = _export(tiny)
    check_mtp_export(names, naming, 1, hf_config=config)  # complete
    exported = [n for n in names if n != dropped]
    check_mtp_export(exported, naming, 1)  # without the config: only core names and depths
    with pytest.raises(IncompleteMtpExportError, match=rf"the config's head has: \['{dropped}'\]"):
        check_mtp_export(exported, naming, 1, hf_config=config)


def test_structural_export_check_falls_back_when_the_config_lacks_sizes():
    from verl_mtp.models.export_check import check_mtp_export

    config, naming, names = _export("glm4_moe")
    del config["num_attention_heads"]
    check_mtp_export([n for n in names if not n.endswith("k_proj.weight")], naming, 1, hf_config=config)
