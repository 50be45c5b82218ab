"""What the corrected mbridge bridges share, importable without mbridge or megatron-core.

The bridge classes themselves (``verl_mtp.models.mbridge_bridges``) subclass mbridge's stock
bridges; everything they share that does not need mbridge at import time lives here: the MTP
name mapping and projection half swap (:class:`MtpBridgeMixin`), Qwen's MTP names
(:func:`qwen_mtp_hf_names`), the shard writer of ``save_weights`` and the registry the classes
join with :func:`register_bridge`.

Without TransformerEngine (CPU), the bridges build megatron's local layer spec and translate
its parameter names (separate ``input_layernorm`` / ``pre_mlp_layernorm``, ``local_experts``)
to the TransformerEngine names the stock name tables know.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any, Callable, Iterable, Optional

import torch

from verl_mtp.models.families import mtp_depths

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


# --- the registry of corrected bridge classes -------------------------------------------------

_REGISTERED: dict[str, type] = {}


def register_bridge(key: str) -> Callable[[type], type]:
    """Class decorator: ``cls`` is the corrected bridge ``key`` names (an entry of
    ``verl_mtp.models.bridges.BRIDGES``, which says which configs it builds)."""

    def register(cls: type) -> type:
        if _REGISTERED.get(key, cls) is not cls:
            raise ValueError(f"bridge {key!r} registered twice: {_REGISTERED[key].__name__} and {cls.__name__}")
        _REGISTERED[key] = cls
        return cls

    return register


def registered_bridges() -> dict[str, type]:
    """``{key: class}`` of the bridges registered so far."""
    return dict(_REGISTERED)
