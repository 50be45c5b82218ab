"""mbridge bridges that convert the MTP head completely (Hugging Face <-> megatron-core).

mbridge 0.15.1 (verl's ``vanilla_mbridge=True`` path) loses or corrupts MTP tensors:

- MiMo maps ``eh_proj`` <-> ``input_proj`` as is, but megatron's ``eh_proj`` multiplies
  ``[embedding, hidden]`` (``MultiTokenPredictionLayer`` concatenates the normalised embedding
  first) while MiMo's ``input_proj`` multiplies ``[hidden, embedding]``: the two column halves
  must be swapped both ways. It also builds the MTP block with TransformerEngine only.
- DeepSeek-V3 hard-codes trunk depth 61 and one MTP depth.
- GLM-4.5 builds no MTP block at all (the MTP tensors are neither loaded nor exported), and maps
  every depth's norms and projection to depth 0.
- There is no Qwen3-Next / Qwen3.5 bridge.

The bridges here subclass the stock ones and are registered through mbridge's own extension
point (``mbridge.core.register_model``): verl-mtp's plugin does so when mbridge is imported
(patch ``mtp_complete_export`` in ``verl_mtp.patches``); :func:`register_bridges` does the same
for code that uses mbridge without verl.

Hugging Face names of megatron's ``mtp.layers.{i}.*`` (``L`` = ``num_hidden_layers``):

- MiMo: ``model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj, final_layernorm}``
  (enorm, hnorm, eh_proj with halves swapped, final_layernorm); layer ``model.mtp_layers.{i}.*``.
- DeepSeek-V3: ``model.layers.{L+i}.{enorm, hnorm, eh_proj, shared_head.norm}``; layer
  ``model.layers.{L+i}.*``; plus copies ``embed_tokens``, ``shared_head.head`` (see below).
- GLM-4.5: as DeepSeek-V3; the copies only when the loaded checkpoint had them.
- Qwen3-Next / Qwen3.5: ``mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm}`` (shared by
  all depths, so one depth) and ``mtp.layers.{i}.*`` (:func:`qwen_mtp_hf_names`).

DeepSeek-V3's per-depth ``embed_tokens`` / ``shared_head.head`` are copies of the trunk's
embedding and lm_head (megatron's MTP uses the trunk's ``embedding`` and ``output_layer``):
on import they are ignored (not even read); on export they are written from the model's
embedding / output layer, so the exported checkpoint is complete as DeepSeek-V3 loaders
(vLLM / SGLang MTP drafters) expect, and a synced drafter gets the current embedding and head.

Without TransformerEngine (CPU), the bridges build megatron's local layer spec and translate
its parameter names (separate ``input_layernorm`` / ``pre_mlp_layernorm``, ``local_experts``)
to the TransformerEngine names the stock name tables know.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from verl_mtp.models.families import Family, detect_family, text_config

# megatron names: mtp.layers.{i}.{rest}; the MTP transformer layer is `transformer_layer` on
# megatron-core <= 0.16 and `mtp_model_layer` on 0.18.
_MCORE_MTP = re.compile(r"mtp\.layers\.(\d+)\.(.+)")
_MCORE_MTP_LAYER = re.compile(r"(?:transformer_layer|mtp_model_layer)\.(.+)")
_MCORE_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")
_TE_EXPERT = re.compile(r"(.*\.mlp\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)")
_LOCAL_EXPERT = re.compile(r"(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """``[A | B]`` -> ``[B | A]`` along the input (last) dimension of a [hidden, 2*hidden] matrix.

    Its own inverse: converts MiMo's ``input_proj`` ([hidden, embedding] columns) to megatron's
    ``eh_proj`` ([embedding, hidden]) and back."""
    if weight.dim() != 2 or weight.shape[1] % 2:
        raise ValueError(f"expected a [out, 2*hidden] projection, got shape {tuple(weight.shape)}")
    first, second = weight.chunk(2, dim=1)
    return torch.cat([second, first], dim=1).contiguous()


def qwen_mtp_hf_names(depth: int, rest: str, trunk_names: Callable[[int, str], list[str]],
                      trunk_layer_prefix: str = "model.layers.", mtp_prefix: str = "") -> list[str]:
    """Hugging Face names of megatron's ``mtp.layers.{depth}.{rest}`` in Qwen3-Next / Qwen3.5 naming.

    ``rest`` is below the depth prefix: ``enorm.weight``, ``hnorm.weight``, ``eh_proj.weight``,
    ``final_layernorm.weight`` or ``{transformer_layer|mtp_model_layer}.X``. ``trunk_names(layer,
    X)`` gives the HF names trunk layer ``layer`` uses for the megatron layer parameter ``X``
    (the family's ordinary trunk mapping); they must start with ``trunk_layer_prefix{layer}.``.
    ``mtp_prefix`` goes in front of ``mtp.`` (Qwen3.5 checkpoints have none).

    The Qwen heads share ``mtp.fc`` and the ``mtp.pre_fc_norm_*`` / ``mtp.norm`` norms; the
    checkpoints declare one depth, and megatron keeps these per depth, so only depth 0 maps.
    ``mtp.fc`` concatenates ``[embedding, hidden]`` (``pre_fc_norm_embedding`` output first),
    the order megatron's ``eh_proj`` uses: no half swap.
    """
    own = {
        "enorm.weight": "pre_fc_norm_embedding.weight",
        "hnorm.weight": "pre_fc_norm_hidden.weight",
        "eh_proj.weight": "fc.weight",
        "final_layernorm.weight": "norm.weight",
    }
    if rest in own:
        if depth != 0:
            raise ValueError(
                f"mtp.layers.{depth}.{rest}: Qwen3-Next / Qwen3.5 checkpoints have one shared "
                f"mtp.{own[rest]} for all depths, so only MTP depth 0 can be converted (set "
                f"mtp_num_layers=1)"
            )
        return [f"{mtp_prefix}mtp.{own[rest]}"]
    layer = _MCORE_MTP_LAYER.fullmatch(rest)
    if layer is None:
        raise ValueError(f"mtp.layers.{depth}.{rest}: not an MTP parameter megatron-core has")
    # Borrow the trunk's naming through a proxy layer index, then move it under mtp.layers.{depth}.
    proxy = 10**6 + depth
    names = trunk_names(proxy, layer.group(1))
    trunk = f"{trunk_layer_prefix}{proxy}."
    out = []
    for n in names:
        if not n.startswith(trunk):
            raise ValueError(f"trunk name {n!r} for {layer.group(1)!r} does not start with {trunk!r}")
        out.append(f"{mtp_prefix}mtp.layers.{depth}.{n[len(trunk):]}")
    return out


class MtpBridgeMixin:
    """What every corrected bridge shares: the MTP block spec, the local-spec fallback, the
    MTP name mapping (through ``_mtp_own_names`` / ``_mtp_layer_names`` per family), the
    projection half swap and the per-depth trunk copies some families store.

    Put it before the stock bridge in the bases (after a family mixin such as
    ``_LayerOffsetMixin``).
    """

    family_name: str = ""
    # MiMo's input_proj multiplies [hidden, embedding]; megatron's eh_proj [embedding, hidden].
    swap_projection_halves: bool = False
    # (megatron trunk param, HF rest name) copies the family stores at each MTP depth.
    trunk_copies: tuple[tuple[str, str], ...] = ()

    # --- model construction --------------------------------------------------------------

    def __init__(self, hf_config, *args, **kwargs):
        ensure_rope_theta(hf_config)
        super().__init__(hf_config, *args, **kwargs)

    def _build_base_config(self, text_config_key=None, **kwargs):
        # The stock GLM-4.5 bridge never declares MTP depths; every family gets the count its
        # config declares (verl's override_transformer_config, in extra_args, still wins).
        from verl_mtp.models import mtp_depths

        depths = mtp_depths(self.hf_config)
        if depths and "mtp_num_layers" not in kwargs:
            kwargs["mtp_num_layers"] = depths
            kwargs.setdefault("mtp_loss_scaling_factor", 0.1)
        return super()._build_base_config(text_config_key, **kwargs)

    def _use_te(self) -> bool:
        return transformer_engine_available()

    def _get_transformer_layer_spec(self, vp_stage: Optional[int] = None):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        import inspect

        kwargs = {}
        self.has_vp_stage = "vp_stage" in inspect.signature(get_gpt_decoder_block_spec).parameters
        if self.has_vp_stage:
            kwargs["vp_stage"] = vp_stage
        # The MTP block spec is derived from this spec in _get_gptmodel_args, which the stock
        # provider calls right after this without the vp_stage.
        self._spec_vp_stage = vp_stage
        self._decoder_spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=self._use_te(), **kwargs)
        return self._decoder_spec

    def _mtp_block_spec(self):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
        import inspect

        spec = getattr(self, "_decoder_spec", None)
        if spec is None or (hasattr(spec, "layer_specs") and not spec.layer_specs):
            # A pipeline stage without decoder layers still needs the layer spec for its MTP.
            spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=self._use_te())
        kwargs = {}
        if "vp_stage" in inspect.signature(get_gpt_mtp_block_spec).parameters:
            kwargs["vp_stage"] = getattr(self, "_spec_vp_stage", None)
        return get_gpt_mtp_block_spec(self.config, spec, use_transformer_engine=self._use_te(), **kwargs)

    def _stock_gptmodel_args(self) -> dict:
        return super()._get_gptmodel_args()

    def _get_gptmodel_args(self) -> dict:
        args = self._stock_gptmodel_args()
        args.pop("mtp_block_spec", None)
        if self.config.mtp_num_layers:
            args["mtp_block_spec"] = self._mtp_block_spec()
        return args

    def _model_provider(self, post_model_creation_callbacks):
        from mbridge.core.llm_bridge import LLMBridge

        # The stock provider of LLMBridge (vocab padding, tied embeddings) with our layer and
        # MTP specs; DeepSeek-V3's own provider hard-codes TransformerEngine specs.
        return LLMBridge._model_provider(self, post_model_creation_callbacks)

    # --- names ---------------------------------------------------------------------------

    def _canonical_name(self, name: str) -> str:
        """Local-spec parameter name -> the TransformerEngine name the stock tables map."""
        expert = _LOCAL_EXPERT.fullmatch(name)
        if expert is not None:
            return f"{expert.group(1)}.{expert.group(3)}.{expert.group(4)}{expert.group(2)}"
        mla = bool(getattr(self.config, "multi_latent_attention", False))
        if name.endswith(".input_layernorm.weight") and not mla:
            return name[: -len("input_layernorm.weight")] + "self_attention.linear_qkv.layer_norm_weight"
        if name.endswith(".pre_mlp_layernorm.weight"):
            return name[: -len("pre_mlp_layernorm.weight")] + "mlp.linear_fc1.layer_norm_weight"
        if mla and name.endswith(".self_attention.q_layernorm.weight"):
            return name[: -len("q_layernorm.weight")] + "linear_q_up_proj.layer_norm_weight"
        if mla and name.endswith(".self_attention.kv_layernorm.weight"):
            return name[: -len("kv_layernorm.weight")] + "linear_kv_up_proj.layer_norm_weight"
        return name

    def _trunk_layer_names(self, layer: int, rest: str) -> list[str]:
        """HF names of megatron ``decoder.layers.{layer}.{rest}`` (the stock trunk mapping)."""
        return super()._weight_name_mapping_mcore_to_hf(self._canonical_name(f"decoder.layers.{layer}.{rest}"))

    def _mtp_own_names(self, depth: int, rest: str) -> list[str]:
        raise NotImplementedError

    def _mtp_layer_names(self, depth: int, rest: str) -> list[str]:
        raise NotImplementedError

    def _mtp_hf_names(self, depth: int, rest: str) -> list[str]:
        if rest in _MCORE_MTP_OWN:
            return self._mtp_own_names(depth, rest)
        layer = _MCORE_MTP_LAYER.fullmatch(rest)
        if layer is None:
            raise NotImplementedError(f"mtp.layers.{depth}.{rest}: unknown MTP parameter for {self.family_name}")
        return self._mtp_layer_names(depth, layer.group(1))

    def _weight_name_mapping_mcore_to_hf(self, mcore_weights_name: str) -> list[str]:
        mtp = _MCORE_MTP.fullmatch(mcore_weights_name)
        if mtp is not None:
            return self._mtp_hf_names(int(mtp.group(1)), mtp.group(2))
        return super()._weight_name_mapping_mcore_to_hf(self._canonical_name(mcore_weights_name))

    # --- tensors -------------------------------------------------------------------------

    def _is_projection(self, mcore_name: str) -> bool:
        return _MCORE_MTP.fullmatch(mcore_name) is not None and mcore_name.endswith(".eh_proj.weight")

    def _copy_names(self, mcore_name: str) -> list[str]:
        """The per-depth HF copies of a trunk tensor this bridge writes on export."""
        return [
            self._mtp_copy_name(depth, hf_rest)
            for source, hf_rest in self.trunk_copies if source == mcore_name
            for depth in range(self.config.mtp_num_layers or 0)
        ]

    def _mtp_copy_name(self, depth: int, hf_rest: str) -> str:
        raise NotImplementedError

    def _stock_weight_to_hf_format(self, mcore_weights_name: str, mcore_weights: torch.Tensor):
        return super()._weight_to_hf_format(mcore_weights_name, mcore_weights)

    def _weight_to_hf_format(self, mcore_weights_name: str, mcore_weights: torch.Tensor):
        if self.swap_projection_halves and self._is_projection(mcore_weights_name):
            return self._weight_name_mapping_mcore_to_hf(mcore_weights_name), [swap_halves(mcore_weights)]
        names, tensors = self._stock_weight_to_hf_format(mcore_weights_name, mcore_weights)
        copies = self._copy_names(mcore_weights_name)
        if copies and len(names) == 1:
            names, tensors = list(names) + copies, list(tensors) + [tensors[0]] * len(copies)
        return names, tensors

    def _weight_to_mcore_format(self, mcore_weights_name: str, hf_weights: list[torch.Tensor]) -> torch.Tensor:
        weight = super()._weight_to_mcore_format(mcore_weights_name, hf_weights)
        if self.swap_projection_halves and self._is_projection(mcore_weights_name):
            weight = swap_halves(weight)
        return weight

    # --- saving --------------------------------------------------------------------------

    def save_weights(self, models: list, weights_path: str, memory_efficient: bool = False) -> None:
        """Write the HF checkpoint (rank 0; other ranks take part in the export only).

        mbridge writes a shard only when every name the *source* index put in it was exported,
        and copies the source index: with fewer MTP depths than the source (or a new tensor)
        whole shards silently vanish while the index still lists them. Here shards follow the
        source index as far as it goes, partial shards are still written, names the source did
        not have go to ``model-extra.safetensors``, and the index lists what was written."""
        import torch.distributed as dist

        from verl_mtp.models.export_check import checked_export

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        stream = checked_export(self.export_weights(models), models, self, self.hf_config,
                                where=f"HF checkpoint {weights_path}")
        if rank != 0:
            for _ in stream:
                pass
            return
        os.makedirs(weights_path, exist_ok=True)
        source_index = dict(self.safetensor_io.index) if self.safetensor_io is not None else {}
        write_hf_shards(stream, weights_path, source_index)
        self.hf_config.save_pretrained(weights_path)

    # --- completeness ----------------------------------------------------------------------

    def expected_mtp_hf_names(self, mcore_names: Iterable[str]) -> list[str]:
        """The HF names an export of a model with these (global) parameter names must contain
        for its MTP head: each ``mtp.*`` parameter's names plus the per-depth trunk copies."""
        out: list[str] = []
        for local_name in mcore_names:
            for name in self._expert_parallel_names(local_name):
                if _MCORE_MTP.fullmatch(name) is not None:
                    out += self._weight_name_mapping_mcore_to_hf(name)
                else:
                    out += self._copy_names(name)
        return out

    def _expert_parallel_names(self, name: str) -> list[str]:
        """A rank holds its local experts only; the export gathers every expert-parallel
        rank's. An expert parameter stands for the same local expert on every EP rank."""
        ep_size = int(getattr(self.mpu, "ep_size", 1) or 1)
        canonical = self._canonical_name(name)
        expert = _TE_EXPERT.fullmatch(canonical)
        if ep_size == 1 or expert is None:
            return [name]
        per_rank = self.config.num_moe_experts // ep_size
        local = int(expert.group(2)) % per_rank
        return [f"{expert.group(1)}{local + per_rank * rank}" for rank in range(ep_size)]


def write_hf_shards(stream: Iterable, path: str, source_index: dict[str, str]) -> dict[str, str]:
    """Write ``(name, tensor)`` pairs as safetensors shards laid out like ``source_index``
    (name -> file); a file is written as soon as it is complete, the rest at the end; names the
    source did not list go to ``model-extra.safetensors`` (or ``model.safetensors`` without a
    source index). Writes ``model.safetensors.index.json`` and returns the written weight map."""
    from collections import defaultdict

    from safetensors.torch import save_file

    expected = defaultdict(set)
    for name, file in source_index.items():
        expected[file].add(name)
    fallback = "model-extra.safetensors" if source_index else "model.safetensors"
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    weight_map: dict[str, str] = {}
    for name, tensor in stream:
        file = source_index.get(name, fallback)
        pending[file][name] = tensor.detach().to("cpu").contiguous()
        weight_map[name] = file
        if file in expected and expected[file] <= pending[file].keys():
            save_file(pending.pop(file), os.path.join(path, file))
    for file, tensors in pending.items():
        save_file(tensors, os.path.join(path, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return weight_map


# --- families -----------------------------------------------------------------------------


def _bridge_base(module: str, cls: str):
    import importlib

    return getattr(importlib.import_module(f"mbridge.models.{module}"), cls)


def _build_bridge_classes() -> dict[str, type]:
    """The corrected bridge classes (built lazily: mbridge imports megatron-core)."""
    MimoBridge = _bridge_base("mimo", "MimoBridge")
    DeepseekV3Bridge = _bridge_base("deepseek_v3", "DeepseekV3Bridge")
    GLM4MoEBridge = _bridge_base("glm4moe", "GLM4MoEBridge")
    Qwen3Bridge = _bridge_base("qwen3", "Qwen3Bridge")
    Qwen2Bridge = _bridge_base("qwen2", "Qwen2Bridge")
    from mbridge.core.llm_bridge import LLMBridge

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

    class QwenMtpNamingBridge(MtpBridgeMixin, Qwen3Bridge):
        """Qwen3-Next / Qwen3.5 MTP names on an ordinary (Qwen3 attention) trunk.

        NOT Qwen3.5's or Qwen3-Next's trunk: megatron-core on CPU cannot build their
        gated-delta-net layers, and mbridge has no bridge for them. This bridge exists to run
        and test :func:`qwen_mtp_hf_names` on a real megatron model (``verl_mtp.models.bridges
        .load_hf_model`` picks it for a ``model_type: qwen3`` config declaring
        ``mtp_num_hidden_layers``); a real Qwen3.5 bridge reuses the same function.
        """

        family_name = "qwen3_5"

        def _mtp_hf_names(self, depth, rest):
            return qwen_mtp_hf_names(depth, rest, self._trunk_layer_names)

    return {
        "mimo": MimoMtpBridge,
        "deepseek_v3": DeepseekV3MtpBridge,
        "glm4_moe": Glm4MoeMtpBridge,
        "qwen_mtp_naming": QwenMtpNamingBridge,
    }


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


def ensure_rope_theta(hf_config: Any) -> None:
    """transformers 5 moves ``rope_theta`` into ``rope_parameters``; mbridge reads the attribute
    (before verl's make_megatron_module would set it)."""
    target = text_config_obj(hf_config)
    if getattr(target, "rope_theta", None) is None:
        params = getattr(target, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
        if theta is not None:
            target.rope_theta = theta


def text_config_obj(config: Any) -> Any:
    nested = getattr(config, "text_config", None)
    return nested if nested is not None and not isinstance(nested, dict) else config


_CLASSES: dict[str, type] | None = None
# model_type -> family key of the classes registered into mbridge's registry.
REGISTERED_MODEL_TYPES = {"mimo": "mimo", "deepseek_v3": "deepseek_v3", "glm4_moe": "glm4_moe"}


def bridge_classes() -> dict[str, type]:
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_bridge_classes()
    return _CLASSES


def register_bridges() -> dict[str, tuple[Any, Any]]:
    """Register the corrected bridges in mbridge's model registry (idempotent).

    Returns ``{model_type: (previous class, new class)}`` for the entries it changed, so a
    caller can undo the registration."""
    from mbridge.core import bridge as mbridge_core

    registry = mbridge_core._MODEL_REGISTRY
    changed = {}
    for model_type, key in REGISTERED_MODEL_TYPES.items():
        new = bridge_classes()[key]
        previous = registry.get(model_type)
        if previous is not new:
            mbridge_core.register_model(model_type)(new)
            changed[model_type] = (previous, new)
    return changed


def unregister_bridges(changed: dict[str, tuple[Any, Any]]) -> None:
    from mbridge.core import bridge as mbridge_core

    for model_type, (previous, _new) in changed.items():
        if previous is None:
            mbridge_core._MODEL_REGISTRY.pop(model_type, None)
        else:
            mbridge_core._MODEL_REGISTRY[model_type] = previous


# --- loading a Hugging Face checkpoint into megatron-core (single process, CPU or GPU) -------


@dataclass
class LoadedModel:
    model: Any  # megatron.core GPTModel (one chunk)
    bridge: Any
    hf_config: dict  # config.json
    family: Family


# TransformerConfig fields that let a bridge-built model run without TransformerEngine (CPU).
_CPU_OVERRIDES = dict(
    use_cpu_initialization=True,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    moe_grouped_gemm=False,
    # the alltoall dispatcher creates a CUDA stream; allgather needs fixed sequence lengths
    moe_token_dispatcher_type="allgather",
    variable_seq_lengths=False,
    # megatron asserts the NVTE_* variables match the backend and sets them process-wide; the
    # other CPU models (and stock bridges) use "auto", DeepSeek-V3's bridge "fused".
    attention_backend="auto",
    moe_shared_expert_overlap=False,
    moe_router_dtype=None,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


# Model types whose config class is remote code, and the transformers class that class derives
# from: its defaults fill the keys config.json leaves out, as loading with trust_remote_code would
# (MiMo's MiMoConfig is Qwen2Config plus num_nextn_predict_layers).
_REMOTE_CONFIG_BASES = {"mimo": "Qwen2Config"}


def _hf_config_object(hf_path: str, config: dict):
    """A transformers config for the bridge: AutoConfig when transformers knows the model type,
    else the remote class's transformers base (``_REMOTE_CONFIG_BASES``) or a plain
    PretrainedConfig, carrying every key of config.json."""
    import transformers
    from transformers import AutoConfig, PretrainedConfig

    try:
        obj = AutoConfig.from_pretrained(hf_path)
    except (ValueError, KeyError):
        base = getattr(transformers, _REMOTE_CONFIG_BASES.get(config.get("model_type"), ""), PretrainedConfig)
        obj = base.from_dict(dict(config))
        for key, value in config.items():
            setattr(obj, key, value)
    return obj


# config.json keys that set tensor shapes or the layer layout, per bridge (``bridge_key``). The
# transformers config classes default them to one full-size model's values, which would build a
# model the checkpoint's tensors do not fit; every other key the bridges read has the default of
# the family's config class (attention_dropout 0.0, rms_norm_eps, rope_theta, ...).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_MOE_SIZES = ("moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
              "first_k_dense_replace")
STRUCTURAL_CONFIG_KEYS = {
    "mimo": _SIZES + ("num_key_value_heads",),
    "deepseek_v3": _SIZES + _MOE_SIZES + ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                          "qk_rope_head_dim", "v_head_dim"),
    "glm4_moe": _SIZES + ("num_key_value_heads",) + _MOE_SIZES,
    "qwen_mtp_naming": _SIZES + ("num_key_value_heads", "head_dim"),
}

# Families detect_family knows that no bridge here can build, and why.
_UNBUILDABLE = {
    "qwen3_next": (
        "its trunk interleaves gated-delta-net (linear attention) layers with gated full attention: "
        "mbridge has no bridge for it, and megatron-core's GatedDeltaNet needs the "
        "flash-linear-attention (fla) Triton kernels, which run on a GPU only"
    ),
}
_UNBUILDABLE["qwen3_5"] = _UNBUILDABLE["qwen3_next"]


def bridge_key(config: dict, family: Family) -> str:
    """The ``bridge_classes()`` key ``load_hf_model`` uses for ``config``; ValueError with the reason
    when none can build it. Imports nothing heavy (checks can run before a load)."""
    model_type = config.get("model_type")
    if model_type in REGISTERED_MODEL_TYPES:
        return REGISTERED_MODEL_TYPES[model_type]
    if model_type == "qwen3" and family.name in ("qwen3_5", "qwen3_next"):
        return "qwen_mtp_naming"
    supported = (
        f"supported: model_type {', '.join(sorted(REGISTERED_MODEL_TYPES))}, and 'qwen3' with Qwen3.5 / "
        f"Qwen3-Next MTP names (ordinary attention trunk)"
    )
    if family.name in _UNBUILDABLE:
        raise ValueError(
            f"config.json model_type={model_type!r}: {family.title} cannot be built into megatron-core "
            f"here, on CPU or GPU: {_UNBUILDABLE[family.name]}; {supported}"
        )
    raise ValueError(f"config.json model_type={model_type!r} ({family.title}): no megatron bridge here; {supported}")


def missing_structural_keys(config: dict, key: str) -> list[str]:
    """The ``STRUCTURAL_CONFIG_KEYS`` of bridge ``key`` that config.json lacks (a key set to null
    counts as present: DeepSeek's ``q_lora_rank: null`` means no query compression)."""
    present = text_config(config)
    return [k for k in STRUCTURAL_CONFIG_KEYS.get(key, ()) if k not in present]


def _bridge_class_for(config: dict, family: Family) -> type:
    key = bridge_key(config, family)
    missing = missing_structural_keys(config, key)
    if missing:
        raise ValueError(
            f"config.json lacks {', '.join(repr(k) for k in missing)}: "
            f"{'it sets' if len(missing) == 1 else 'they set'} tensor shapes or the layer layout of "
            f"{family.title}, so no default is assumed; add {'it' if len(missing) == 1 else 'them'} to config.json"
        )
    return bridge_classes()[key]


def load_hf_model(hf_path: str, *, mtp_num_layers: int | None = None, dtype=torch.float32) -> LoadedModel:
    """Build a megatron-core GPTModel with MTP from a Hugging Face checkpoint and load its weights.

    Single process: initialises gloo and megatron's parallel state (TP=PP=1) when needed; works
    on CPU (local layer spec, fusions off) and on CUDA (the model is moved there when CUDA is
    available). ``mtp_num_layers`` overrides the declared depth count (``None``: the
    checkpoint's). The returned model is in eval mode.
    """
    from verl_mtp.models import mtp_depths
    from verl_mtp.local_megatron.single_process import cpu_megatron, init_single_process_megatron

    with open(os.path.join(hf_path, "config.json")) as f:
        config = json.load(f)
    family = detect_family(config)
    bridge_cls = _bridge_class_for(config, family)
    depths = mtp_depths(config) if mtp_num_layers is None else mtp_num_layers
    if depths < 1:
        raise ValueError(f"{hf_path}: config.json declares no MTP depth and mtp_num_layers={mtp_num_layers!r}")

    init_single_process_megatron()
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()  # sized by the first model built in the process
    on_cpu = not torch.cuda.is_available()
    with cpu_megatron() if on_cpu else contextlib.nullcontext():
        bridge = bridge_cls(_hf_config_object(hf_path, config), dtype=dtype)
        # Without TransformerEngine (CPU, or a GPU machine without it) the local spec is built,
        # which needs the fused kernels off as well.
        portable = on_cpu or not transformer_engine_available()
        overrides = dict(_CPU_OVERRIDES) if portable else {}
        overrides.update(mtp_num_layers=depths, mtp_loss_scaling_factor=0.1)
        overrides.update(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype is torch.bfloat16,
                         fp16=dtype is torch.float16)
        bridge.set_extra_args(**overrides)
        provider = bridge._model_provider([])
        model = provider(pre_process=True, post_process=True)
        # megatron's local-spec norms keep fp32 weights (training wraps the model in Float16Module,
        # which casts everything); cast here so a bf16/fp16 model is uniformly that dtype.
        if dtype is not torch.float32:
            model = model.to(dtype)
        if not on_cpu:
            model = model.cuda()
        bridge.load_weights([model], hf_path)
    model.eval()
    return LoadedModel(model=model, bridge=bridge, hf_config=config, family=family)


def export_hf_weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Every tensor of the model under its Hugging Face name, MTP head included (CPU copies).

    The export stream is checked for MTP completeness (``verl_mtp.models.export_check``)."""
    from verl_mtp.models.export_check import checked_export
    from verl_mtp.local_megatron.single_process import cpu_megatron

    on_cpu = not torch.cuda.is_available()
    out: dict[str, torch.Tensor] = {}
    with cpu_megatron() if on_cpu else contextlib.nullcontext():
        stream = checked_export(loaded.bridge.export_weights([loaded.model]), [loaded.model],
                                loaded.bridge, hf_config=loaded.hf_config)
        for name, tensor in stream:
            if name in out:
                raise ValueError(f"export produced {name!r} twice")
            out[name] = tensor.detach().to("cpu", copy=True)
    return out
