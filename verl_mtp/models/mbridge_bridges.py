"""The corrected mbridge bridges: MiMo, DeepSeek-V3, GLM-4.5 and Qwen MTP naming on a Qwen3 trunk.

mbridge 0.15.1 (verl's ``vanilla_mbridge=True`` path) loses or corrupts MTP tensors:

- MiMo maps ``eh_proj`` <-> ``input_proj`` as is, but megatron's ``eh_proj`` multiplies
  ``[embedding, hidden]`` (``MultiTokenPredictionLayer`` concatenates the normalised embedding
  first) while MiMo's ``input_proj`` multiplies ``[hidden, embedding]``: the two column halves
  must be swapped both ways. It also builds the MTP block with TransformerEngine only.
- DeepSeek-V3 hard-codes trunk depth 61 and one MTP depth.
- GLM-4.5 builds no MTP block at all (the MTP tensors are neither loaded nor exported), and maps
  every depth's norms and projection to depth 0.
- There is no Qwen3-Next / Qwen3.5 bridge.

The classes here subclass the stock ones, so importing this module imports mbridge (and
megatron-core): only ``verl_mtp.models.bridges.bridge_classes`` does, when a bridge is needed.
Each class joins the registry with ``@register_bridge``; verl-mtp's plugin registers them into
mbridge's own model registry when mbridge is imported (patch ``mtp_complete_export``).

Hugging Face names of megatron's ``mtp.layers.{i}.*`` (``L`` = ``num_hidden_layers``):

- MiMo: ``model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj, final_layernorm}``
  (enorm, hnorm, eh_proj with halves swapped, final_layernorm); layer ``model.mtp_layers.{i}.*``.
- DeepSeek-V3: ``model.layers.{L+i}.{enorm, hnorm, eh_proj, shared_head.norm}``; layer
  ``model.layers.{L+i}.*``; plus copies ``embed_tokens``, ``shared_head.head`` (see below).
- GLM-4.5: as DeepSeek-V3; the copies only when the loaded checkpoint had them.
- Qwen3-Next / Qwen3.5: ``mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm}`` (shared by
  all depths, so one depth) and ``mtp.layers.{i}.*`` (``qwen_mtp_hf_names``).

DeepSeek-V3's per-depth ``embed_tokens`` / ``shared_head.head`` are copies of the trunk's
embedding and lm_head (megatron's MTP uses the trunk's ``embedding`` and ``output_layer``):
on import they are ignored (not even read); on export they are written from the model's
embedding / output layer, so the exported checkpoint is complete as DeepSeek-V3 loaders
(vLLM / SGLang MTP drafters) expect, and a synced drafter gets the current embedding and head.
"""

from __future__ import annotations

import torch
from mbridge.core.llm_bridge import LLMBridge
from mbridge.models.deepseek_v3 import DeepseekV3Bridge
from mbridge.models.glm4moe import GLM4MoEBridge
from mbridge.models.mimo import MimoBridge
from mbridge.models.qwen2 import Qwen2Bridge
from mbridge.models.qwen3 import Qwen3Bridge

from verl_mtp.models.mtp_bridge import MtpBridgeMixin, qwen_mtp_hf_names, register_bridge


@register_bridge("mimo")
class MimoMtpBridge(MtpBridgeMixin, MimoBridge):
    """MiMo: ``model.mtp_layers.{i}``; ``input_proj`` halves swapped ([hidden, emb] in HF)."""

    family_name = "mimo"
    swap_projection_halves = True

    def _stock_gptmodel_args(self):
        # MimoBridge's own adds a TransformerEngine-only MTP spec; the Qwen2 arguments suffice.
        return Qwen2Bridge._get_gptmodel_args(self)

    _OWN = {
        "enorm.weight": "token_layernorm.weight",
        "hnorm.weight": "hidden_layernorm.weight",
        "eh_proj.weight": "input_proj.weight",
        "final_layernorm.weight": "final_layernorm.weight",
    }

    def _mtp_own_names(self, depth, rest):
        return [f"model.mtp_layers.{depth}.{self._OWN[rest]}"]

    def _mtp_layer_names(self, depth, rest):
        trunk = f"model.layers.{depth}."
        names = self._trunk_layer_names(depth, rest)
        return [f"model.mtp_layers.{depth}.{n[len(trunk):]}" for n in names]


class _LayerOffsetMixin:
    """DeepSeek-V3 / GLM-4.5: MTP depth i is HF layer ``model.layers.{num_hidden_layers + i}``."""

    _OWN = {
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "final_layernorm.weight": "shared_head.norm.weight",
    }
    trunk_copies = (
        ("embedding.word_embeddings.weight", "embed_tokens.weight"),
        ("output_layer.weight", "shared_head.head.weight"),
    )

    def _hf_layer(self, depth: int) -> int:
        return int(self.hf_config.num_hidden_layers) + depth

    def _mtp_own_names(self, depth, rest):
        return [f"model.layers.{self._hf_layer(depth)}.{self._OWN[rest]}"]

    def _mtp_layer_names(self, depth, rest):
        return self._trunk_layer_names(self._hf_layer(depth), rest)

    def _mtp_copy_name(self, depth, hf_rest):
        return f"model.layers.{self._hf_layer(depth)}.{hf_rest}"


@register_bridge("deepseek_v3")
class DeepseekV3MtpBridge(_LayerOffsetMixin, MtpBridgeMixin, DeepseekV3Bridge):
    """DeepSeek-V3: any trunk depth and any number of MTP depths."""

    family_name = "deepseek_v3"

    def _stock_weight_to_hf_format(self, mcore_weights_name, mcore_weights):
        # Skip DeepseekV3Bridge's override (copies for 61 layers / one depth only); the
        # mixin writes the copies for every depth.
        return LLMBridge._weight_to_hf_format(self, mcore_weights_name, mcore_weights)

    def _get_transformer_layer_spec(self, vp_stage=None):
        spec = super()._get_transformer_layer_spec(vp_stage)
        if not self._use_te():
            spec = _with_cpu_latent_attention(spec)
            self._decoder_spec = spec
        return spec

    def _model_provider(self, post_model_creation_callbacks):
        provider = MtpBridgeMixin._model_provider(self, post_model_creation_callbacks)
        if self._use_te():
            return provider

        def cpu_provider(*args, **kwargs):
            from verl_mtp.megatron.cpu_attention import latent_attention_without_te

            with latent_attention_without_te():
                return provider(*args, **kwargs)

        return cpu_provider

    def _build_base_config(self, text_config_key=None, **kwargs):
        # mbridge passes `max_position_embeddings`, which MLATransformerConfig of
        # megatron-core >= 0.16 calls `original_max_position_embeddings`.
        fields = self.TransformerConfigClass.__dataclass_fields__
        if "max_position_embeddings" in kwargs and "max_position_embeddings" not in fields:
            value = kwargs.pop("max_position_embeddings")
            if "original_max_position_embeddings" in fields:
                kwargs["original_max_position_embeddings"] = value
        return super()._build_base_config(text_config_key, **kwargs)

    def _get_safetensor_io(self, weights_path):
        if self.dtype == torch.bfloat16:
            return super()._get_safetensor_io(weights_path)  # FP8 checkpoints dequantised
        from mbridge.core.safetensor_io import SafeTensorIO

        return SafeTensorIO(self._get_actual_hf_path(weights_path))


@register_bridge("glm4_moe")
class Glm4MoeMtpBridge(_LayerOffsetMixin, MtpBridgeMixin, GLM4MoEBridge):
    """GLM-4.5: builds the MTP block (stock builds none) and maps depth i to layer L+i."""

    family_name = "glm4_moe"
    # Written only when the loaded checkpoint stored them (see load_weights).
    trunk_copies = ()

    def load_weights(self, models, weights_path, memory_efficient=False):
        io = self._get_safetensor_io(weights_path)
        stored = set(io.load_hf_weight_names())
        first_mtp = int(self.hf_config.num_hidden_layers)
        self.trunk_copies = tuple(
            pair for pair in _LayerOffsetMixin.trunk_copies
            if f"model.layers.{first_mtp}.{pair[1]}" in stored
        )
        return super().load_weights(models, weights_path, memory_efficient)


@register_bridge("qwen_mtp_naming")
class QwenMtpNamingBridge(MtpBridgeMixin, Qwen3Bridge):
    """Qwen3-Next / Qwen3.5 MTP names on an ordinary (Qwen3 attention) trunk.

    NOT Qwen3.5's or Qwen3-Next's trunk: megatron-core on CPU cannot build their
    gated-delta-net layers, and mbridge has no bridge for them. This bridge exists to run
    and test :func:`qwen_mtp_hf_names` on a real megatron model (``verl_mtp.local_megatron
    .hf_model.load_hf_model`` picks it for a ``model_type: qwen3`` config declaring
    ``mtp_num_hidden_layers``); a real Qwen3.5 bridge reuses the same function.
    """

    family_name = "qwen3_5"

    def _mtp_hf_names(self, depth, rest):
        return qwen_mtp_hf_names(depth, rest, self._trunk_layer_names)


def _with_cpu_latent_attention(block_spec):
    """A copy of a decoder block spec whose MLA layers use the plain-torch core attention
    (megatron's local MLA spec cannot be built without TransformerEngine)."""
    import copy

    from verl_mtp.megatron.cpu_attention import CpuLatentCoreAttention

    block_spec = copy.deepcopy(block_spec)
    for layer in getattr(block_spec, "layer_specs", None) or [block_spec]:
        attention = getattr(layer.submodules, "self_attention", None)
        if attention is not None and hasattr(attention.submodules, "core_attention"):
            attention.submodules.core_attention = CpuLatentCoreAttention
    return block_spec
