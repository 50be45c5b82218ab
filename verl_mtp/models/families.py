"""Per-family MTP weight naming on the Hugging Face side.

Every name an MTP tool needs to know about a model family lives here: how to recognise the family
from ``config.json``, which config key declares the number of MTP depths, which tensor names form
MTP depth ``i``, which of them must exist for a depth to be usable, and which trunk tensors a
drafter shares with the verifier (embedding, lm_head).

An MTP tensor is identified across checkpoints of one family by its *key*: ``(depth, rest)``
where ``depth`` is the MTP depth (0-based) or ``None`` for a tensor every depth shares (Qwen's
``mtp.fc`` and norms), and ``rest`` is the name below the depth's own prefix. Two checkpoints of
one family hold "the same" MTP tensor when the keys are equal, even when the full names differ
(DeepSeek-V3 checkpoints with different trunk depths, Qwen3.5 names with a ``model.language_model.``
prefix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from verl_mtp.errors import VerlMtpError

# (depth, rest); depth None = shared by every depth.
MtpKey = tuple[Optional[int], str]

# The names a drafter takes from the trunk (same suffix in every supported family). No family here
# shares the trunk's final norm with its MTP head: each head has its own (final_layernorm,
# shared_head.norm, mtp.norm).
DRAFTER_SHARED_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


class UnknownFamilyError(VerlMtpError, ValueError):
    """config.json names a model family this package has no MTP naming for."""


def text_config(config: dict) -> dict:
    """The language-model part of a config: ``text_config`` when the config nests one."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def hf_config_dict(hf_config: Any) -> dict:
    """A model's ``config.json`` as a dict, from a dict or a transformers config."""
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a config.json dict or a transformers config, got {type(hf_config).__name__}")


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class MtpNaming:
    """Which tensor names of one checkpoint belong to its MTP head, and under which key.

    Built by ``Family.naming(config, depths, names)``; ``depths`` is the declared depth count.
    """

    def __init__(self, family: "Family", depths: int):
        self.family = family
        self.depths = depths

    def key(self, name: str) -> Optional[MtpKey]:
        """The MTP key of a tensor name, or None when the tensor is not part of the MTP head."""
        raise NotImplementedError

    def name(self, key: MtpKey) -> str:
        """The tensor name a key has in this checkpoint (``rest='*'`` renders a wildcard)."""
        raise NotImplementedError

    def is_mtp(self, name: str) -> bool:
        return self.key(name) is not None

    def depth_of(self, name: str) -> Optional[int]:
        """MTP depth of a tensor; None for non-MTP tensors and for tensors shared by all depths."""
        key = self.key(name)
        return None if key is None else key[0]

    def names_of_depth(self, names: Iterable[str], depth: Optional[int]) -> list[str]:
        """The names (of ``names``) that belong to MTP depth ``depth`` (None = the shared ones)."""
        out = []
        for n in names:
            key = self.key(n)
            if key is not None and key[0] == depth:
                out.append(n)
        return sorted(out, key=_natural)

    def required_keys(self) -> list[MtpKey]:
        """The core tensors a complete head has for the declared depth count."""
        keys: list[MtpKey] = []
        if self.depths > 0:
            keys += [(None, rest) for rest in self.family.shared_core]
        for depth in range(self.depths):
            keys += [(depth, rest) for rest in self.family.core]
        return keys

    def projection_keys(self) -> list[MtpKey]:
        """Keys of the [hidden, 2*hidden] projections that fuse embedding and hidden state."""
        if self.family.projection_shared:
            return [(None, self.family.projection)] if self.depths > 0 else []
        return [(d, self.family.projection) for d in range(self.depths)]

    def is_drafter_shared(self, name: str) -> bool:
        """A trunk tensor a drafter needs besides its MTP layers (embedding, lm_head)."""
        if self.is_mtp(name):
            return False
        return any(name == s or name.endswith("." + s) for s in self.family.drafter_suffixes)


class _NumberedModuleNaming(MtpNaming):
    """MTP depth ``i`` lives under ``{stem}.{i + offset}.``; indices below ``offset`` are trunk."""

    def __init__(self, family: "Family", depths: int, stem: str, offset: int = 0):
        super().__init__(family, depths)
        self.stem = stem
        self.offset = offset
        self._pattern = re.compile(re.escape(stem) + r"\.(\d+)\.(.+)")

    def key(self, name: str) -> Optional[MtpKey]:
        m = self._pattern.fullmatch(name)
        if m is None or int(m.group(1)) < self.offset:
            return None
        return int(m.group(1)) - self.offset, m.group(2)

    def name(self, key: MtpKey) -> str:
        depth, rest = key
        if depth is None:
            raise ValueError(f"{self.family.title} has no MTP tensors shared across depths: {rest}")
        return f"{self.stem}.{depth + self.offset}.{rest}"


class _MtpModuleNaming(MtpNaming):
    """Qwen3-Next / Qwen3.5: everything under a ``mtp.`` component (at any prefix); depth ``i`` is
    ``mtp.layers.{i}.``, the rest of ``mtp.`` (fc, norms) is shared by every depth."""

    _pattern = re.compile(r"((?:[^.]+\.)*?)mtp\.(.+)")
    _layer = re.compile(r"layers\.(\d+)\.(.+)")

    def __init__(self, family: "Family", depths: int, names: Iterable[str] = ()):
        super().__init__(family, depths)
        prefixes: dict[str, int] = {}
        for n in names:
            m = self._pattern.fullmatch(n)
            if m is not None:
                prefixes[m.group(1)] = prefixes.get(m.group(1), 0) + 1
        # The prefix new names get; the one most tensors of this checkpoint use, else none.
        self.prefix = max(prefixes, key=prefixes.get) if prefixes else ""

    def key(self, name: str) -> Optional[MtpKey]:
        m = self._pattern.fullmatch(name)
        if m is None:
            return None
        rest = m.group(2)
        layer = self._layer.fullmatch(rest)
        if layer is not None:
            return int(layer.group(1)), layer.group(2)
        return None, rest

    def name(self, key: MtpKey) -> str:
        depth, rest = key
        if depth is None:
            return f"{self.prefix}mtp.{rest}"
        return f"{self.prefix}mtp.layers.{depth}.{rest}"


@dataclass(frozen=True)
class Family:
    """One model family's MTP layout on the Hugging Face side.

    name: short id (``deepseek_v3``). title: for humans.
    model_types / architectures: how ``config.json`` names it (top level or under ``text_config``).
    depth_key: the config key that declares the MTP depth count.
    layout: the MTP weight names, for messages.
    core: per-depth tensors (``rest`` names) that identify a depth (the family's own fusion
        tensors); the whole layout, derived from config.json, is ``verl_mtp.models.head_spec``'s.
    shared_core: tensors shared by all depths that a complete head has (Qwen).
    projection: the [hidden, 2*hidden] input projection (``rest`` name), per depth or shared.
    drafter_suffixes: trunk tensors a drafter needs besides the MTP layers.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    depth_key: str
    layout: str
    core: tuple[str, ...]
    projection: str
    build_naming: Callable[..., MtpNaming]
    shared_core: tuple[str, ...] = ()
    projection_shared: bool = False
    drafter_suffixes: tuple[str, ...] = DRAFTER_SHARED_SUFFIXES

    def matches_model_type(self, config: dict) -> bool:
        return any(cfg.get("model_type") in self.model_types for cfg in (config, text_config(config)))

    def matches_architecture(self, config: dict) -> bool:
        archs = [a for cfg in (config, text_config(config)) for a in (cfg.get("architectures") or [])]
        return any(a in self.architectures for a in archs)

    def naming(self, config: dict, depths: int, names: Iterable[str] = ()) -> MtpNaming:
        """The MTP naming of a checkpoint with this config, ``depths`` declared depths and these
        tensor names (Qwen uses them to learn the prefix in front of ``mtp.``)."""
        return self.build_naming(config, depths, names, self)


_REGISTRY: dict[str, Family] = {}
NamingBuilder = Callable[[dict, int, Iterable[str], Family], MtpNaming]


def register_family(**fields: Any) -> Callable[[NamingBuilder], NamingBuilder]:
    """Decorator: the naming builder below serves the family these ``Family`` fields describe
    (detection tries families in the order they are registered)."""

    def register(build: NamingBuilder) -> NamingBuilder:
        family = Family(build_naming=build, **fields)
        if family.name in _REGISTRY:
            raise ValueError(f"model family {family.name!r} registered twice")
        _REGISTRY[family.name] = family
        return build

    return register


@register_family(
    name="mimo",
    title="MiMo",
    model_types=("mimo",),
    architectures=("MiMoForCausalLM",),
    depth_key="num_nextn_predict_layers",
    layout="model.mtp_layers.{i}.*",
    core=("input_proj.weight", "token_layernorm.weight", "hidden_layernorm.weight", "final_layernorm.weight"),
    projection="input_proj.weight",
)
def _mimo_naming(config: dict, depths: int, names: Iterable[str], family: Family) -> MtpNaming:
    return _NumberedModuleNaming(family, depths, "model.mtp_layers")


# DeepSeek-V3 and GLM-4.5 store MTP depth i as trunk layer num_hidden_layers + i.
_LAYER_OFFSET_HEAD = dict(
    depth_key="num_nextn_predict_layers",
    layout="model.layers.{num_hidden_layers + i}.*",
    core=("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"),
    projection="eh_proj.weight",
)


@register_family(name="deepseek_v3", title="DeepSeek-V3", model_types=("deepseek_v3",),
                 architectures=("DeepseekV3ForCausalLM",), **_LAYER_OFFSET_HEAD)
def _layer_offset_naming(config: dict, depths: int, names: Iterable[str], family: Family) -> MtpNaming:
    trunk_layers = text_config(config).get("num_hidden_layers")
    if isinstance(trunk_layers, bool) or not isinstance(trunk_layers, int) or trunk_layers < 0:
        raise ValueError(
            f"config.json num_hidden_layers={trunk_layers!r}: {family.title} stores MTP depth i as "
            f"model.layers.{{num_hidden_layers + i}}, so a non-negative integer is needed"
        )
    return _NumberedModuleNaming(family, depths, "model.layers", offset=trunk_layers)


register_family(name="glm4_moe", title="GLM-4.5", model_types=("glm4_moe",),
                architectures=("Glm4MoeForCausalLM",), **_LAYER_OFFSET_HEAD)(_layer_offset_naming)

# Qwen3-Next and Qwen3.5: one mtp.fc and its norms shared by every depth, depth i under mtp.layers.{i}.
_QWEN_MTP_HEAD = dict(
    depth_key="mtp_num_hidden_layers",
    core=(),
    shared_core=("fc.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight"),
    projection="fc.weight",
    projection_shared=True,
)


@register_family(name="qwen3_next", title="Qwen3-Next", model_types=("qwen3_next",),
                 architectures=("Qwen3NextForCausalLM",),
                 layout="mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm}, mtp.layers.{i}.*",
                 **_QWEN_MTP_HEAD)
def _mtp_module_naming(config: dict, depths: int, names: Iterable[str], family: Family) -> MtpNaming:
    return _MtpModuleNaming(family, depths, names)


register_family(
    name="qwen3_5",
    title="Qwen3.5",
    model_types=("qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"),
    architectures=(
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
        "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM",
    ),
    layout="[prefix.]mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, norm}, [prefix.]mtp.layers.{i}.*",
    **_QWEN_MTP_HEAD,
)(_mtp_module_naming)

FAMILIES: tuple[Family, ...] = tuple(_REGISTRY.values())

# Config keys that declare the depth count, in the order verl_mtp.config looks at them.
DEPTH_KEYS = tuple(dict.fromkeys(f.depth_key for f in FAMILIES))


def known_families() -> str:
    return "; ".join(f"{f.title} (model_type {' / '.join(f.model_types)})" for f in FAMILIES)


def detect_family(config: dict) -> Family:
    """The family of a ``config.json``: by ``model_type`` (top level, then ``text_config``), then by
    ``architectures``. Raises UnknownFamilyError listing the known families."""
    for test in (Family.matches_model_type, Family.matches_architecture):
        for family in FAMILIES:
            if test(family, config):
                return family
    model_type = config.get("model_type")
    nested = text_config(config).get("model_type") if text_config(config) is not config else None
    seen = f"model_type={model_type!r}" + (f", text_config.model_type={nested!r}" if nested else "")
    seen += f", architectures={config.get('architectures')!r}"
    raise UnknownFamilyError(f"unknown model family ({seen}); known MTP families: {known_families()}")


def family_by_name(name: str) -> Family:
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UnknownFamilyError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def _field(config: Any, key: str):
    # config.json as a dict, or a transformers PretrainedConfig (attributes).
    if config is None:
        return None
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def depth_key_location(config: Any) -> Optional[tuple[Optional[str], str]]:
    """Where the depth count is declared: ``(None, key)`` at top level, ``("text_config", key)``
    nested, or None when no key declares a positive count. ``config`` is a dict or a
    transformers config."""
    for parent, cfg in ((None, config), ("text_config", _field(config, "text_config"))):
        for key in DEPTH_KEYS:
            value = _field(cfg, key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return parent, key
    return None


def mtp_depths(config: Any) -> int:
    """Declared MTP depth count (0 if none); the detection ``verl-mtp explain`` uses too."""
    where = depth_key_location(config)
    if where is None:
        return 0
    parent, key = where
    return _field(_field(config, parent) if parent else config, key)


def _declared_key(config: dict) -> Optional[tuple[Optional[str], str]]:
    # Like depth_key_location, but also finds a key present with value 0 / null.
    nested = config.get("text_config")
    for parent, cfg in ((None, config), ("text_config", nested)):
        if isinstance(cfg, dict):
            for key in DEPTH_KEYS:
                if key in cfg:
                    return parent, key
    return None


def with_depths(config: dict, depths: int, like: dict, family: Family) -> dict:
    """A copy of ``config`` declaring ``depths`` MTP depths: updates the key where ``config``
    declares it, else puts it where ``like`` (another config of the family) does."""
    out = _deep_copy(config)
    where = depth_key_location(config) or _declared_key(config) or depth_key_location(like) or (None, family.depth_key)
    parent, key = where
    target = out.get(parent) if parent else out
    if not isinstance(target, dict):
        target = out
    target[key] = depths
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
