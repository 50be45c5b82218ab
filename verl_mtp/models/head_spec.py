"""The complete MTP head a checkpoint's ``config.json`` calls for, and the check of a head against it.

:func:`head_spec` derives, per family, every tensor an MTP depth has on the Hugging Face side (its
decoder layer: attention of the family's kind, dense or MoE MLP, norms; the family's own fusion
tensors; the trunk copies a family stores per depth) and every shape, from the config's own sizes.
:func:`check_head` compares what a checkpoint holds (names and shapes, nothing else) with that and
lists the missing, unexpected and misshapen tensors per depth. ``verl-mtp ckpt`` (inspect, extract,
stitch, graft), the resume-time check of ``verl_mtp.ckpt.mtp_manifest`` and the structural export
check of ``verl_mtp.models.export_check`` all use these two functions.

Shapes follow the Hugging Face modelling code of each family (``nn.Linear`` weights are
``[out_features, in_features]``):

- MiMo: a Qwen2 decoder layer (q/k/v with bias, o without; dense MLP of ``intermediate_size``);
  ``token_layernorm``, ``hidden_layernorm``, ``input_proj [h, 2h]``, ``final_layernorm``.
- DeepSeek-V3: MLA (``q_a_proj``/``q_a_layernorm``/``q_b_proj``, or ``q_proj`` when
  ``q_lora_rank`` is null; ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``);
  MoE at layer ``num_hidden_layers + i`` when ``first_k_dense_replace`` / ``moe_layer_freq`` make
  it one (router ``gate`` with ``e_score_correction_bias`` for ``topk_method: noaux_tc``, routed
  and shared experts); ``enorm``, ``hnorm``, ``eh_proj [h, 2h]``, ``shared_head.norm`` and the
  per-depth copies ``embed_tokens`` / ``shared_head.head [vocab, h]`` the released checkpoints
  carry and vLLM / SGLang load.
- GLM-4.5: GQA with ``attention_bias`` on q/k/v and optional ``use_qk_norm``; MoE as DeepSeek-V3
  (the router always has its correction bias); the per-depth copies are optional (GLM-4.5 ships
  them, later releases do not).
- Qwen3-Next / Qwen3.5: ``mtp.{fc [h, 2h], pre_fc_norm_embedding, pre_fc_norm_hidden, norm}``
  shared by every depth; each ``mtp.layers.{i}`` a full-attention layer with the output gate
  (``q_proj [2 * heads * head_dim, h]``), ``q_norm``/``k_norm``; Qwen3-Next's MLP is MoE where
  ``decoder_sparse_step`` / ``mlp_only_layers`` say so, Qwen3.5 MoE's always, Qwen3.5 dense's
  never; MoE has a router, routed experts (one tensor per expert, or the fused
  ``experts.gate_up_proj [E, 2I, h]`` / ``experts.down_proj [E, h, I]``), ``shared_expert`` and
  ``shared_expert_gate [1, h]``.

Quantized checkpoints: with ``quantization_config.quant_method == "fp8"`` each linear weight may
carry ``weight_scale_inv`` (shape ``ceil(out / block) x ceil(in / block)`` with
``weight_block_size``), ``weight_scale`` or ``input_scale``; other methods pack or rename linear
weights, so their linear layers are checked by module only (a note says so).

Plain Python on a JSON config: no torch, no transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from verl_mtp.models.families import Family, MtpKey, MtpNaming, text_config

NORM, LINEAR, BIAS, ROUTER, EMBEDDING = "norm", "linear", "bias", "router", "embedding"
FP8_COMPANIONS = ("weight_scale_inv", "weight_scale", "input_scale")
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Expected:
    """One tensor of an MTP head: its shape and what it is (``linear`` weights may be quantized)."""

    shape: tuple[int, ...]
    kind: str
    required: bool = True


Tensors = dict[str, Expected]  # rest name (below the depth's prefix) -> expected


@dataclass
class HeadSpec:
    """Every tensor a complete head of ``depths`` depths has, derived from one config.json.

    ``shared``: tensors every depth shares (Qwen's ``mtp.fc`` and norms). ``per_depth[i]``:
    depth i's tensors. ``variants[i]``: groups of alternative layouts of depth i (per-expert or
    fused experts); the layout most of whose tensors are present is the one checked.
    ``problems``: config.json values the spec needed but could not use (the spec is then partial).
    """

    family: Family
    depths: int
    shared: Tensors = field(default_factory=dict)
    per_depth: list[Tensors] = field(default_factory=list)
    variants: list[list[list[tuple[str, Tensors]]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quant_method: Optional[str] = None
    fp8_block: Optional[tuple[int, int]] = None

    @property
    def derivable(self) -> bool:
        return not self.problems

    def required_names(self, naming: MtpNaming) -> list[str]:
        """Full names of every required tensor (the first layout of each variant group)."""
        out = [naming.name((None, rest)) for rest, e in self.shared.items() if e.required]
        for depth in range(self.depths):
            tensors = dict(self.per_depth[depth])
            for group in self.variants[depth]:
                tensors.update(group[0][1])
            out += [naming.name((depth, rest)) for rest, e in tensors.items() if e.required]
        return out


class _Config:
    """Typed reads of config.json values; every problem is collected, not raised."""

    def __init__(self, config: dict, family: Family):
        self.top = config
        self.cfg = text_config(config)
        self.family = family
        self.problems: list[str] = []

    def _where(self, key: str) -> str:
        return f"text_config.{key}" if self.cfg is not self.top else key

    def size(self, key: str, default: Any = None, *, allow_zero: bool = False) -> int:
        """A positive integer (0 too with ``allow_zero``); ``default`` when the key is absent
        (None: the key is required)."""
        if key not in self.cfg or (self.cfg[key] is None and default is not None):
            if default is None:
                self.problems.append(
                    f"config.json has no {self._where(key)}, which the {self.family.title} MTP layer's shapes need"
                )
                return 1
            return default
        value = self.cfg[key]
        low = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.problems.append(
                f"config.json {self._where(key)}={value!r}: expected an integer >= {low}"
            )
            return 1
        return value

    def optional_size(self, key: str) -> Optional[int]:
        """A positive integer or null (the key must be present)."""
        if key in self.cfg and self.cfg[key] is None:
            return None
        return self.size(key)

    def flag(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"config.json {self._where(key)}={value!r}: expected true or false")
            return default
        return value

    def int_list(self, key: str) -> list[int]:
        value = self.cfg.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            self.problems.append(f"config.json {self._where(key)}={value!r}: expected a list of layer indices")
            return []
        return value

    def head_dim(self, hidden: int, heads: int) -> int:
        if self.cfg.get("head_dim") is not None:
            return self.size("head_dim")
        if hidden % heads:
            self.problems.append(
                f"config.json has no {self._where('head_dim')} and hidden_size {hidden} is not a multiple of "
                f"num_attention_heads {heads}"
            )
        return max(1, hidden // heads)


# --- building blocks --------------------------------------------------------------------------


def _linear(out: Tensors, name: str, rows: int, cols: int, bias: bool = False, kind: str = LINEAR) -> None:
    out[f"{name}.weight"] = Expected((rows, cols), kind)
    if bias:
        out[f"{name}.bias"] = Expected((rows,), BIAS)


def _norm(out: Tensors, name: str, size: int) -> None:
    out[f"{name}.weight"] = Expected((size,), NORM)


def _gqa(c: _Config, h: int, *, qkv_bias: bool, o_bias: bool, qk_norm: bool, output_gate: bool) -> Tensors:
    heads = c.size("num_attention_heads")
    kv_heads = c.size("num_key_value_heads")
    d = c.head_dim(h, heads)
    out: Tensors = {}
    _linear(out, "self_attn.q_proj", heads * d * (2 if output_gate else 1), h, qkv_bias)
    _linear(out, "self_attn.k_proj", kv_heads * d, h, qkv_bias)
    _linear(out, "self_attn.v_proj", kv_heads * d, h, qkv_bias)
    _linear(out, "self_attn.o_proj", h, heads * d, o_bias)
    if qk_norm:
        _norm(out, "self_attn.q_norm", d)
        _norm(out, "self_attn.k_norm", d)
    return out


def _mla(c: _Config, h: int) -> Tensors:
    heads = c.size("num_attention_heads")
    q_lora = c.optional_size("q_lora_rank")
    kv_lora = c.size("kv_lora_rank")
    nope, rope, v = c.size("qk_nope_head_dim"), c.size("qk_rope_head_dim"), c.size("v_head_dim")
    bias = c.flag("attention_bias", False)
    out: Tensors = {}
    if q_lora is None:
        _linear(out, "self_attn.q_proj", heads * (nope + rope), h)
    else:
        _linear(out, "self_attn.q_a_proj", q_lora, h, bias)
        _norm(out, "self_attn.q_a_layernorm", q_lora)
        _linear(out, "self_attn.q_b_proj", heads * (nope + rope), q_lora)
    _linear(out, "self_attn.kv_a_proj_with_mqa", kv_lora + rope, h, bias)
    _norm(out, "self_attn.kv_a_layernorm", kv_lora)
    _linear(out, "self_attn.kv_b_proj", heads * (nope + v), kv_lora)
    _linear(out, "self_attn.o_proj", h, heads * v, bias)
    return out


def _mlp(prefix: str, h: int, inter: int) -> Tensors:
    out: Tensors = {}
    _linear(out, f"{prefix}.gate_proj", inter, h)
    _linear(out, f"{prefix}.up_proj", inter, h)
    _linear(out, f"{prefix}.down_proj", h, inter)
    return out


def _per_expert(h: int, experts: int, inter: int) -> Tensors:
    out: Tensors = {}
    for e in range(experts):
        out.update(_mlp(f"mlp.experts.{e}", h, inter))
    return out


def _fused_experts(h: int, experts: int, inter: int) -> Tensors:
    return {
        "mlp.experts.gate_up_proj": Expected((experts, 2 * inter, h), "experts"),
        "mlp.experts.down_proj": Expected((experts, h, inter), "experts"),
    }


def _layer_norms(h: int) -> Tensors:
    out: Tensors = {}
    _norm(out, "input_layernorm", h)
    _norm(out, "post_attention_layernorm", h)
    return out


# --- families ---------------------------------------------------------------------------------


def _mimo(c: _Config, depths: int, spec: HeadSpec) -> None:
    h = c.size("hidden_size")
    inter = c.size("intermediate_size")
    for _ in range(depths):
        t = _layer_norms(h)
        # MiMo's layer is Qwen2's: q/k/v always carry a bias, o_proj never.
        t.update(_gqa(c, h, qkv_bias=True, o_bias=False, qk_norm=False, output_gate=False))
        t.update(_mlp("mlp", h, inter))
        _norm(t, "token_layernorm", h)
        _norm(t, "hidden_layernorm", h)
        _linear(t, "input_proj", h, 2 * h)
        _norm(t, "final_layernorm", h)
        spec.per_depth.append(t)
        spec.variants.append([])


def _deepseek_moe(c: _Config, h: int, *, experts_key: str, always_bias: bool) -> Tensors:
    experts = c.size(experts_key)
    inter = c.size("moe_intermediate_size")
    # Absent: the config classes' default of one shared expert; null: none.
    shared = 0 if "n_shared_experts" in c.cfg and c.cfg["n_shared_experts"] is None else c.size(
        "n_shared_experts", 1, allow_zero=True)
    out: Tensors = {"mlp.gate.weight": Expected((experts, h), ROUTER)}
    topk_method = c.cfg.get("topk_method", "noaux_tc")
    if always_bias or topk_method == "noaux_tc":
        out["mlp.gate.e_score_correction_bias"] = Expected((experts,), ROUTER)
    out.update(_per_expert(h, experts, inter))
    if shared:
        out.update(_mlp("mlp.shared_experts", h, inter * shared))
    return out


def _layer_offset(c: _Config, depths: int, spec: HeadSpec, *, mla: bool) -> None:
    h = c.size("hidden_size")
    vocab = c.size("vocab_size")
    trunk = c.size("num_hidden_layers", allow_zero=True)
    first_dense = c.size("first_k_dense_replace", 3 if mla else 1, allow_zero=True)
    freq = c.size("moe_layer_freq", 1) if mla else 1
    experts_key = "n_routed_experts"
    for depth in range(depths):
        layer = trunk + depth
        t = _layer_norms(h)
        if mla:
            t.update(_mla(c, h))
        else:
            t.update(_gqa(c, h, qkv_bias=c.flag("attention_bias", False), o_bias=False,
                          qk_norm=c.flag("use_qk_norm", False), output_gate=False))
        moe = c.cfg.get(experts_key) is not None and layer >= first_dense and layer % freq == 0
        if moe:
            t.update(_deepseek_moe(c, h, experts_key=experts_key, always_bias=not mla))
        else:
            t.update(_mlp("mlp", h, c.size("intermediate_size")))
        _norm(t, "enorm", h)
        _norm(t, "hnorm", h)
        _linear(t, "eh_proj", h, 2 * h)
        _norm(t, "shared_head.norm", h)
        # Copies of the trunk's embedding and lm_head: DeepSeek-V3 checkpoints carry them and its
        # loaders read them; GLM-4.5 shipped them, later GLM releases dropped them.
        t["embed_tokens.weight"] = Expected((vocab, h), EMBEDDING, required=mla)
        t["shared_head.head.weight"] = Expected((vocab, h), EMBEDDING, required=mla)
        spec.per_depth.append(t)
        spec.variants.append([])


def _is_moe_qwen35(config: dict) -> bool:
    types = [cfg.get("model_type") or "" for cfg in (config, text_config(config))]
    archs = [a for cfg in (config, text_config(config)) for a in (cfg.get("architectures") or [])]
    return any("moe" in t for t in types) or any("Moe" in a for a in archs)


def _qwen(c: _Config, depths: int, spec: HeadSpec, *, moe_rule: str) -> None:
    h = c.size("hidden_size")
    spec.shared = {}
    _linear(spec.shared, "fc", h, 2 * h)
    _norm(spec.shared, "pre_fc_norm_embedding", h)
    _norm(spec.shared, "pre_fc_norm_hidden", h)
    _norm(spec.shared, "norm", h)
    bias = c.flag("attention_bias", False)
    for depth in range(depths):
        t = _layer_norms(h)
        t.update(_gqa(c, h, qkv_bias=bias, o_bias=bias, qk_norm=True, output_gate=True))
        if moe_rule == "always":
            moe = True
        elif moe_rule == "never":
            moe = False
        else:  # Qwen3-Next: the MTP layer index is its depth
            experts = c.size("num_experts", allow_zero=True)
            step = c.size("decoder_sparse_step", 1)
            moe = experts > 0 and depth not in c.int_list("mlp_only_layers") and (depth + 1) % step == 0
        groups: list[list[tuple[str, Tensors]]] = []
        if moe:
            experts = c.size("num_experts")
            inter = c.size("moe_intermediate_size")
            shared = c.size("shared_expert_intermediate_size", allow_zero=True)
            t["mlp.gate.weight"] = Expected((experts, h), ROUTER)
            if shared:
                t.update(_mlp("mlp.shared_expert", h, shared))
                t["mlp.shared_expert_gate.weight"] = Expected((1, h), ROUTER)
            groups.append([("one tensor per expert", _per_expert(h, experts, inter)),
                           ("fused experts", _fused_experts(h, experts, inter))])
        else:
            t.update(_mlp("mlp", h, c.size("intermediate_size")))
        spec.per_depth.append(t)
        spec.variants.append(groups)


def _quantization(config: dict, spec: HeadSpec) -> None:
    qc = config.get("quantization_config") or text_config(config).get("quantization_config")
    if not isinstance(qc, dict):
        return
    method = qc.get("quant_method")
    spec.quant_method = str(method) if method is not None else "unknown"
    if spec.quant_method == "fp8":
        block = qc.get("weight_block_size")
        if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
            spec.fp8_block = (block[0], block[1])
    else:
        spec.notes.append(
            f"quantization_config.quant_method={spec.quant_method!r}: quantized linear layers are checked by "
            f"module only (their packed weights' names and shapes are not)"
        )


def head_spec(family: Family, config: dict, depths: int) -> HeadSpec:
    """Every tensor (name below the depth prefix, shape) of a complete ``depths``-depth head for
    this config. Config values that are missing or bad are listed in ``problems``."""
    spec = HeadSpec(family=family, depths=depths)
    c = _Config(config, family)
    if family.name == "mimo":
        _mimo(c, depths, spec)
    elif family.name == "deepseek_v3":
        _layer_offset(c, depths, spec, mla=True)
    elif family.name == "glm4_moe":
        _layer_offset(c, depths, spec, mla=False)
    elif family.name == "qwen3_next":
        _qwen(c, depths, spec, moe_rule="sparse_step")
    elif family.name == "qwen3_5":
        _qwen(c, depths, spec, moe_rule="always" if _is_moe_qwen35(config) else "never")
    else:  # a family added to the table without a layout here
        raise ValueError(f"no MTP head layout for family {family.name!r}")
    if depths == 0:
        spec.shared = {}
    _quantization(config, spec)
    spec.problems = list(dict.fromkeys(c.problems))
    return spec


# --- the check ----------------------------------------------------------------------------------


@dataclass
class HeadCheck:
    """What is wrong with a head. Names are full tensor names; ``depth`` labels are ``"shared"`` or
    the depth number as text (``"beyond"`` for tensors past the declared depth count)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    beyond_depths: list[str] = field(default_factory=list)
    misshapen: list[str] = field(default_factory=list)  # "name [shape], expected [shape]"
    config: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    by_depth: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.misshapen or self.config)

    def _add(self, kind: str, depth: str, entry: str) -> None:
        getattr(self, kind).append(entry)
        self.by_depth.setdefault(depth, {}).setdefault(kind, []).append(entry)

    def lines(self, limit: Optional[int] = None) -> list[str]:
        """One line per problem (experts folded), for messages."""
        out = [f"config: {p}" for p in self.config]
        out += [f"missing {n}" for n in fold_expert_names(self.missing)]
        out += [f"misshapen {m}" for m in fold_expert_names(self.misshapen)]
        out += [f"beyond the declared depth(s): {n}" for n in fold_expert_names(self.beyond_depths)]
        beyond = set(self.beyond_depths)
        out += [f"unexpected {n}" for n in fold_expert_names([n for n in self.unexpected if n not in beyond])]
        if limit is not None and len(out) > limit:
            out = out[:limit] + [f"... and {len(out) - limit} more"]
        return out


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _companion(spec: HeadSpec, rest: str, expected: Tensors, shape: tuple[int, ...]) -> Optional[str]:
    """For a tensor not in the layout: None when it is a quantization companion of an expected
    linear layer (shape fine), an error text when it is one with a wrong shape, "" otherwise."""
    if spec.quant_method is None or "." not in rest:
        return ""
    module, suffix = rest.rsplit(".", 1)
    weight = expected.get(f"{module}.weight")
    if weight is None or weight.kind != LINEAR:
        return ""
    if spec.quant_method != "fp8":
        return None
    if suffix not in FP8_COMPANIONS:
        return ""
    if suffix == "weight_scale_inv" and spec.fp8_block is not None:
        rows, cols = weight.shape
        want = (math.ceil(rows / spec.fp8_block[0]), math.ceil(cols / spec.fp8_block[1]))
        if tuple(shape) != want:
            return f"expected {_shape(want)} (weight {_shape(weight.shape)} in blocks of {_shape(spec.fp8_block)})"
    return None


def check_head(spec: HeadSpec, naming: MtpNaming, present: Mapping[MtpKey, Optional[tuple[int, ...]]]) -> HeadCheck:
    """Compare a checkpoint's MTP tensors (key -> shape; None: shape unknown, names only) with ``spec``."""
    check = HeadCheck(config=list(spec.problems), notes=list(spec.notes))
    depths = spec.depths
    if depths == 0:
        check.config.append(
            f"config.json declares no MTP depth ({spec.family.depth_key} > 0, also accepted under text_config)"
        )
    groups: dict[Optional[int], dict[str, tuple[int, ...]]] = {}
    for (depth, rest), shape in present.items():
        if (depth is None and depths == 0) or (depth is not None and depth >= depths):
            check._add("beyond_depths", "beyond", naming.name((depth, rest)))
            check._add("unexpected", "beyond", naming.name((depth, rest)))
            continue
        groups.setdefault(depth, {})[rest] = None if shape is None else tuple(shape)
    layouts: list[tuple[Optional[int], Tensors]] = []
    if depths:
        layouts.append((None, spec.shared))
    for depth in range(depths):
        tensors = dict(spec.per_depth[depth]) if depth < len(spec.per_depth) else {}
        held = groups.get(depth, {})
        for group in spec.variants[depth] if depth < len(spec.variants) else []:
            counts = [sum(rest in held for rest in variant) for _, variant in group]
            tensors.update(group[counts.index(max(counts))][1])
        layouts.append((depth, tensors))
    for depth, tensors in layouts:
        label = "shared" if depth is None else str(depth)
        held = groups.get(depth, {})
        if depth is not None and not held:
            check._add("missing", label, naming.name((depth, "*")))
            continue
        loose = spec.quant_method not in (None, "fp8")
        # Sizes the config could not give make every shape wrong: report the config instead.
        shapes = spec.derivable
        for rest, want in tensors.items():
            name = naming.name((depth, rest))
            if rest not in held:
                if want.required and not (loose and want.kind == LINEAR):
                    check._add("missing", label, name)
            elif shapes and held[rest] is not None and held[rest] != want.shape and not (loose and want.kind == LINEAR):
                check._add("misshapen", label, f"{name} {_shape(held[rest])}, expected {_shape(want.shape)}")
        for rest in sorted(set(held) - set(tensors), key=_natural):
            verdict = _companion(spec, rest, tensors, held[rest] or ())
            name = naming.name((depth, rest))
            if verdict == "":
                check._add("unexpected", label, name)
            elif verdict and shapes:
                check._add("misshapen", label, f"{name} {_shape(held[rest])}, {verdict}")
    return check


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def fold_expert_names(entries: Iterable[str]) -> list[str]:
    """Entries differing only in an ``experts.{n}`` index fold into one with ``{a..b}`` (or a
    list); order of first appearance is kept."""
    folded: dict[str, list[int]] = {}
    for entry in entries:
        m = _EXPERT_INDEX.search(entry)
        pattern = entry if m is None else entry[: m.start()] + ".experts.{}." + entry[m.end():]
        folded.setdefault(pattern, [])
        if m is not None:
            folded[pattern].append(int(m.group(1)))
    out = []
    for pattern, ids in folded.items():
        if not ids:
            out.append(pattern)
        elif len(ids) == 1:
            out.append(pattern.replace("{}", str(ids[0])))
        else:
            ids = sorted(set(ids))
            contiguous = ids == list(range(ids[0], ids[-1] + 1))
            span = f"{{{ids[0]}..{ids[-1]}}}" if contiguous else "{" + ",".join(map(str, ids)) + "}"
            out.append(pattern.replace("{}", span))
    return out
