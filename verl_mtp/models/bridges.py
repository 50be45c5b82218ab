"""mbridge bridges that convert the MTP head completely (Hugging Face <-> megatron-core): which
configs they build, and the classes.

The bridge classes (``verl_mtp.models.mbridge_bridges``, which imports mbridge) correct what
mbridge 0.15.1 loses or corrupts of the MTP head for MiMo, DeepSeek-V3 and GLM-4.5, and map
Qwen3-Next / Qwen3.5 MTP names onto an ordinary Qwen3 trunk. verl-mtp's plugin registers them
into mbridge's model registry when mbridge is imported (patch ``mtp_complete_export``).

This module stays importable without mbridge: ``BRIDGES`` says which ``config.json`` each bridge
builds and which keys it cannot default, so a checkpoint can be refused before anything heavy
is imported (``bridge_key``, ``missing_structural_keys``); ``bridge_classes`` imports the
classes when a model is built (``verl_mtp.local_megatron.hf_model.load_hf_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verl_mtp.models.families import Family, text_config
from verl_mtp.models.mtp_bridge import registered_bridges

# config.json keys that set tensor shapes or the layer layout. The transformers config classes
# default them to one full-size model's values, which would build a model the checkpoint's tensors
# do not fit; every other key the bridges read has the default of the family's config class
# (attention_dropout 0.0, rms_norm_eps, rope_theta, ...).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_MOE_SIZES = ("moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
              "first_k_dense_replace")


@dataclass(frozen=True)
class BridgeEntry:
    """Which ``config.json`` a corrected bridge (registered under ``key``) builds.

    model_types: the ``model_type`` values it builds; they are registered into mbridge's registry.
    trunk_model_type / mtp_families: it also builds a ``trunk_model_type`` config whose MTP names
        are those of one of ``mtp_families`` (not registered into mbridge).
    structural_keys: keys config.json must have (no default is assumed for them).
    """

    key: str
    structural_keys: tuple[str, ...]
    model_types: tuple[str, ...] = ()
    trunk_model_type: str = ""
    mtp_families: tuple[str, ...] = ()

    def builds(self, model_type: Any, family: Family) -> bool:
        return model_type in self.model_types or (
            model_type == self.trunk_model_type and family.name in self.mtp_families
        )


BRIDGES: dict[str, BridgeEntry] = {entry.key: entry for entry in (
    BridgeEntry("mimo", _SIZES + ("num_key_value_heads",), model_types=("mimo",)),
    BridgeEntry("deepseek_v3", _SIZES + _MOE_SIZES + ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                      "qk_rope_head_dim", "v_head_dim"),
                model_types=("deepseek_v3",)),
    BridgeEntry("glm4_moe", _SIZES + ("num_key_value_heads",) + _MOE_SIZES, model_types=("glm4_moe",)),
    BridgeEntry("qwen_mtp_naming", _SIZES + ("num_key_value_heads", "head_dim"),
                trunk_model_type="qwen3", mtp_families=("qwen3_5", "qwen3_next")),
)}
# model_type -> bridge key, for the classes registered into mbridge's registry.
REGISTERED_MODEL_TYPES = {model_type: e.key for e in BRIDGES.values() for model_type in e.model_types}


def bridge_classes() -> dict[str, type]:
    """``{bridge key: class}`` of every corrected bridge (imports mbridge and megatron-core)."""
    # mbridge first: importing it runs the plugin's registry patch, which calls this function
    # again; mbridge_bridges must not be half-imported then.
    import mbridge  # noqa: F401

    import verl_mtp.models.mbridge_bridges  # noqa: F401 - its classes register themselves

    classes = registered_bridges()
    unbuilt = sorted(set(BRIDGES) - set(classes))
    if unbuilt:
        raise RuntimeError(f"verl_mtp.models.mbridge_bridges registers no class for bridge(s) {unbuilt}")
    return classes


def mbridge_registrations() -> dict[str, type]:
    """``{model_type: corrected class}``: what verl-mtp puts into mbridge's model registry."""
    classes = bridge_classes()
    return {model_type: classes[key] for model_type, key in REGISTERED_MODEL_TYPES.items()}


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
    """The ``bridge_classes()`` key a loader uses for ``config``; ValueError with the reason
    when none can build it. Imports nothing heavy (checks can run before a load)."""
    model_type = config.get("model_type")
    for entry in BRIDGES.values():
        if entry.builds(model_type, family):
            return entry.key
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
    """The structural keys (``BRIDGES[key]``) config.json lacks (a key set to null counts as
    present: DeepSeek's ``q_lora_rank: null`` means no query compression)."""
    present = text_config(config)
    entry = BRIDGES.get(key)
    return [k for k in (entry.structural_keys if entry else ()) if k not in present]


def bridge_class_for(config: dict, family: Family) -> type:
    """The corrected bridge class that builds ``config``; ValueError naming what is missing."""
    key = bridge_key(config, family)
    missing = missing_structural_keys(config, key)
    if missing:
        raise ValueError(
            f"config.json lacks {', '.join(repr(k) for k in missing)}: "
            f"{'it sets' if len(missing) == 1 else 'they set'} tensor shapes or the layer layout of "
            f"{family.title}, so no default is assumed; add {'it' if len(missing) == 1 else 'them'} to config.json"
        )
    return bridge_classes()[key]


# Model types whose config class is remote code, and the transformers class that class derives
# from: its defaults fill the keys config.json leaves out, as loading with trust_remote_code would
# (MiMo's MiMoConfig is Qwen2Config plus num_nextn_predict_layers).
_REMOTE_CONFIG_BASES = {"mimo": "Qwen2Config"}


def hf_config_object(hf_path: str, config: dict):
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
