"""Tiny random Hugging Face checkpoints (config.json + safetensors) in each family's real layout.

The tensor names and shapes are written out here from each family's Hugging Face layout,
independently of any bridge, so a load -> export round trip through a bridge tests its name
mapping against the real layout. Families: MiMo (Qwen2 trunk, ``model.mtp_layers``),
DeepSeek-V3 (MLA + MoE, MTP at ``model.layers.{L+i}`` with ``embed_tokens`` /
``shared_head.head`` copies), GLM-4.5 (GQA + MoE, MTP at ``model.layers.{L+i}``) and Qwen MTP
names (``mtp.*``) on a Qwen3 attention trunk (``qwen_mtp``: NOT Qwen3.5's gated-delta-net trunk,
which megatron-core cannot build on CPU).

For the header-only checkpoint tools there are also Qwen3-Next (``qwen3_next``), Qwen3.5 dense
(``qwen3_5``) and Qwen3.5 MoE (``qwen3_5_moe``, ``text_config`` nested, trunk under
``model.language_model.``): their MTP layers are exact (gated attention ``q_proj`` of twice the
heads, ``q_norm``/``k_norm``, MoE with ``shared_expert`` and ``shared_expert_gate``; the config key
``_fused_experts`` writes Qwen3.5's fused ``experts.gate_up_proj`` / ``experts.down_proj``
instead of one tensor per expert), while their trunk layers are plain full-attention layers
(the trunk's linear-attention layers play no part in the MTP head).
"""

from __future__ import annotations

import json
import os

import torch

_COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    hidden_act="silu",
    torch_dtype="float32",
)


def tiny_config(family: str, mtp_depths: int = 1, **overrides) -> dict:
    """config.json of a tiny model of ``family`` (mimo, deepseek_v3, glm4_moe, qwen_mtp)."""
    if family == "mimo":
        config = dict(_COMMON, model_type="mimo", architectures=["MiMoForCausalLM"],
                      num_nextn_predict_layers=mtp_depths)
    elif family == "deepseek_v3":
        config = dict(
            _COMMON, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
            num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=1.0,
            n_group=1, topk_group=1, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
            rope_scaling=None, num_nextn_predict_layers=mtp_depths,
        )
    elif family == "glm4_moe":
        config = dict(
            _COMMON, model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, routed_scaling_factor=1.0, n_group=1, topk_group=1,
            norm_topk_prob=True, partial_rotary_factor=0.5, use_qk_norm=False, attention_bias=True,
            num_nextn_predict_layers=mtp_depths,
        )
    elif family == "qwen_mtp":
        config = dict(_COMMON, model_type="qwen3", architectures=["Qwen3_5ForCausalLM"], head_dim=8,
                      attention_bias=False, mtp_num_hidden_layers=mtp_depths)
    elif family == "qwen3_next":
        config = dict(
            _COMMON, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], head_dim=8,
            attention_bias=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[],
            full_attention_interval=4, mtp_num_hidden_layers=mtp_depths,
        )
    elif family in ("qwen3_5", "qwen3_5_moe"):
        text = dict(_COMMON, model_type=f"{family}_text", head_dim=8, attention_bias=False,
                    mtp_num_hidden_layers=mtp_depths)
        if family == "qwen3_5_moe":
            del text["intermediate_size"]
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16)
        text.update(overrides)
        arch = "Qwen3_5MoeForConditionalGeneration" if family == "qwen3_5_moe" else "Qwen3_5ForConditionalGeneration"
        return dict(model_type=family, architectures=[arch], text_config=text, vision_config={"depth": 1},
                    tie_word_embeddings=False)
    else:
        raise ValueError(
            f"unknown tiny family {family!r}; choose mimo, deepseek_v3, glm4_moe, qwen_mtp, qwen3_next, "
            f"qwen3_5, qwen3_5_moe"
        )
    config.update(overrides)
    return config


_QWEN_GATED = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")  # attention with an output gate


def _attention(p: str, c: dict) -> dict:
    h = c["hidden_size"]
    if c["model_type"] == "deepseek_v3":
        heads = c["num_attention_heads"]
        qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        if c["q_lora_rank"] is None:  # no query compression: one q_proj
            q = {f"{p}self_attn.q_proj.weight": (heads * qk, h)}
        else:
            q = {
                f"{p}self_attn.q_a_proj.weight": (c["q_lora_rank"], h),
                f"{p}self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
                f"{p}self_attn.q_b_proj.weight": (heads * qk, c["q_lora_rank"]),
            }
        return {
            **q,
            f"{p}self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            f"{p}self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
            f"{p}self_attn.kv_b_proj.weight": (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
            f"{p}self_attn.o_proj.weight": (h, heads * c["v_head_dim"]),
        }
    d = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    gate = 2 if c["model_type"] in _QWEN_GATED else 1  # q_proj also yields the output gate
    out = {
        f"{p}self_attn.q_proj.weight": (gate * q, h),
        f"{p}self_attn.k_proj.weight": (kv, h),
        f"{p}self_attn.v_proj.weight": (kv, h),
        f"{p}self_attn.o_proj.weight": (h, q),
    }
    if c["model_type"] == "mimo" or (c["model_type"] == "glm4_moe" and c.get("attention_bias")):  # qkv bias
        out.update({f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,), f"{p}self_attn.v_proj.bias": (kv,)})
    if c["model_type"] in ("qwen3",) + _QWEN_GATED or c.get("use_qk_norm"):
        out.update({f"{p}self_attn.q_norm.weight": (d,), f"{p}self_attn.k_norm.weight": (d,)})
    return out


def _gated_mlp(p: str, inner: int, h: int) -> dict:
    """A SwiGLU MLP's projections under ``p`` (dense, one expert or a shared expert)."""
    return {f"{p}gate_proj.weight": (inner, h), f"{p}up_proj.weight": (inner, h), f"{p}down_proj.weight": (h, inner)}


def _qwen_moe(p: str, c: dict) -> dict:
    h, f, experts, shared = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["shared_expert_intermediate_size"]
    out = {f"{p}mlp.gate.weight": (experts, h)}
    if c.get("_fused_experts"):
        out.update({f"{p}mlp.experts.gate_up_proj": (experts, 2 * f, h), f"{p}mlp.experts.down_proj": (experts, h, f)})
    else:
        for e in range(experts):
            out.update(_gated_mlp(f"{p}mlp.experts.{e}.", f, h))
    out.update(_gated_mlp(f"{p}mlp.shared_expert.", shared, h))
    out[f"{p}mlp.shared_expert_gate.weight"] = (1, h)
    return out


def _mlp(p: str, c: dict, moe: bool) -> dict:
    h = c["hidden_size"]
    if moe and "num_experts" in c:
        return _qwen_moe(p, c)
    if not moe:
        return _gated_mlp(f"{p}mlp.", c["intermediate_size"], h)
    f, experts = c["moe_intermediate_size"], c["n_routed_experts"]
    out = {f"{p}mlp.gate.weight": (experts, h), f"{p}mlp.gate.e_score_correction_bias": (experts,)}
    for e in range(experts):
        out.update(_gated_mlp(f"{p}mlp.experts.{e}.", f, h))
    out.update(_gated_mlp(f"{p}mlp.shared_experts.", f * c["n_shared_experts"], h))
    return out


def _layer(p: str, c: dict, moe: bool) -> dict:
    h = c["hidden_size"]
    out = {f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)}
    out.update(_attention(p, c))
    out.update(_mlp(p, c, moe))
    return out


def hf_tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a checkpoint with config ``c`` (see ``tiny_config``)."""
    nested = "text_config" in c
    lm = "model.language_model." if nested else "model."
    c = c["text_config"] if nested else c
    h, vocab, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    moe_family = c["model_type"] in ("deepseek_v3", "glm4_moe")
    qwen_moe = c["model_type"] in ("qwen3_next", "qwen3_5_moe_text")

    def is_moe(i: int) -> bool:
        if qwen_moe:  # Qwen3.5 MoE: every layer; Qwen3-Next: decoder_sparse_step / mlp_only_layers
            step = c.get("decoder_sparse_step", 1)
            return i not in c.get("mlp_only_layers", []) and (i + 1) % step == 0
        return moe_family and i >= c["first_k_dense_replace"]

    out = {f"{lm}embed_tokens.weight": (vocab, h), f"{lm}norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(layers):
        out.update(_layer(f"{lm}layers.{i}.", c, is_moe(i)))
    if c["model_type"] == "mimo":
        for i in range(c["num_nextn_predict_layers"]):
            p = f"model.mtp_layers.{i}."
            out.update(_layer(p, c, False))
            out.update({f"{p}token_layernorm.weight": (h,), f"{p}hidden_layernorm.weight": (h,),
                        f"{p}input_proj.weight": (h, 2 * h), f"{p}final_layernorm.weight": (h,)})
    elif moe_family:
        for i in range(c["num_nextn_predict_layers"]):
            p = f"model.layers.{layers + i}."
            out.update(_layer(p, c, is_moe(layers + i)))
            out.update({f"{p}enorm.weight": (h,), f"{p}hnorm.weight": (h,), f"{p}eh_proj.weight": (h, 2 * h),
                        f"{p}shared_head.norm.weight": (h,)})
            if c["model_type"] == "deepseek_v3" or c.get("_mtp_trunk_copies"):
                out.update({f"{p}embed_tokens.weight": (vocab, h), f"{p}shared_head.head.weight": (vocab, h)})
    else:  # Qwen MTP names
        out.update({"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                    "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)})
        for i in range(c["mtp_num_hidden_layers"]):
            out.update(_layer(f"mtp.layers.{i}.", c, is_moe(i)))  # the MTP layer's index is its depth
    return out


def random_tensors(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors for every name; the per-depth trunk copies (DeepSeek-V3's
    ``embed_tokens`` / ``shared_head.head`` at ``model.layers.{L+i}``) equal the trunk's, as in
    the released checkpoints."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_tensor_shapes(c).items():
        if "norm" in name and len(shape) == 1:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = 0.2 * torch.randn(shape, generator=g)
    layers = c.get("text_config", c)["num_hidden_layers"]
    for name in list(out):
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
            if name.endswith(".embed_tokens.weight"):
                out[name] = out["model.embed_tokens.weight"].clone()
            elif name.endswith(".shared_head.head.weight"):
                out[name] = out["lm_head.weight"].clone()
    return out


def write_checkpoint(path: str, config: dict, tensors: dict[str, torch.Tensor], shards: int = 2) -> str:
    """config.json + ``shards`` safetensors files + model.safetensors.index.json."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    if isinstance(public.get("text_config"), dict):
        public["text_config"] = {k: v for k, v in public["text_config"].items() if not k.startswith("_")}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(public, f, indent=2)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return path


def write_tiny_checkpoint(path: str, family: str, mtp_depths: int = 1, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """Write a tiny random checkpoint of ``family`` to ``path``; returns its tensors."""
    config = tiny_config(family, mtp_depths, **overrides)
    tensors = random_tensors(config, seed)
    write_checkpoint(path, config, tensors)
    return tensors
