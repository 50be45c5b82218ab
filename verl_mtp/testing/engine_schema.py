"""The parts of vLLM's and SGLang's argument classes that verl-mtp's speculative arguments must fit,
derived from the engines' source and checked without importing the engines (a test fixture: the
product's own checks live in ``verl_mtp.rollout.spec_args``; the recorded schema lives in the
repository's ``tests/data``, not in the wheel).

CI cannot install vLLM or SGLang (several GB, CUDA), so ``tests/data/engine_schema.json`` records,
for one pinned version of each engine, what their config classes accept:

- vLLM ``vllm/config/speculative.py``: the ``SpeculativeConfig`` field names, the ``method`` choices
  (the ``SpeculativeMethod`` literal, flattened), the MTP method names it rewrites to ``mtp``, the
  lower bound of ``num_speculative_tokens``, and which target model type / architecture becomes
  which MTP draft model type (``hf_config_override``).
- SGLang ``sglang/srt/server_args.py`` (``ServerArgs``: the speculative and CPU-backup fields with
  their annotations), ``sglang/srt/speculative/spec_info.py`` (the ``SpeculativeAlgorithm`` names)
  and ``sglang/srt/configs/model_config.py`` (target architecture -> MTP draft architecture).

Regenerate it from unpacked wheels (``pip download --no-deps vllm==X sglang==Y`` and unzip)::

    python -m verl_mtp.testing.engine_schema --vllm-src DIR --sglang-src DIR --out tests/data/engine_schema.json

where DIR holds the ``vllm/`` (``sglang/``) package directory and its ``*.dist-info``. The source is parsed (``ast``), never
imported, so this runs on any machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from typing import Any, Iterable, Mapping, Optional

# ServerArgs fields the schema keeps: the ones verl-mtp's checks read or produce.
SGLANG_FIELDS_KEPT = re.compile(r"^(speculative_.*|enable_weights_cpu_backup|enable_draft_weights_cpu_backup|"
                                r"attention_backend|page_size|max_running_requests|enable_memory_saver)$")


def _read(root: str, *parts: str) -> str:
    with open(os.path.join(root, *parts)) as f:
        return f.read()


def _package_version(root: str, package: str) -> str:
    """The version in the unpacked wheel's ``<package>-<version>.dist-info/METADATA``."""
    for entry in sorted(os.listdir(root)):
        if entry.startswith(f"{package}-") and entry.endswith(".dist-info"):
            m = re.search(r"^Version:\s*(\S+)", _read(root, entry, "METADATA"), re.M)
            if m:
                return m.group(1)
    raise ValueError(f"no {package}-*.dist-info/METADATA under {root}: unzip the wheel's dist-info too")


def _class_fields(tree: ast.Module, class_name: str) -> dict[str, str]:
    """Annotated class attributes (dataclass fields) -> annotation source."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise ValueError(f"class {class_name} not found")


def _literal_aliases(tree: ast.Module) -> dict[str, list]:
    """Module-level ``Name = Literal[...]`` assignments: their elements (strings, or names of other
    literals)."""
    out: dict[str, list] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Subscript) and ast.unparse(value.value).endswith("Literal"):
                elts = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
                out[node.targets[0].id] = [
                    e.value if isinstance(e, ast.Constant) else e.id for e in elts
                    if isinstance(e, (ast.Constant, ast.Name))
                ]
    return out


def _flatten_literal(name: str, aliases: Mapping[str, list]) -> list[str]:
    out: list[str] = []
    for item in aliases[name]:
        out += _flatten_literal(item, aliases) if item in aliases else [item]
    return list(dict.fromkeys(out))


def _constants(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _renames(func: ast.FunctionDef, subject: re.Pattern, target: re.Pattern) -> dict[str, str]:
    """``if <subject> == "A"`` / ``in ("A", "B")`` followed in its body by ``<target> = "X"``:
    {"A": "X", "B": "X"}. Walks every ``if`` in the function."""
    out: dict[str, str] = {}
    for node in ast.walk(func):
        if not isinstance(node, ast.If):
            continue
        renamed = [
            stmt.value.value for stmt in node.body
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            and target.fullmatch(ast.unparse(stmt.targets[0])) and isinstance(stmt.value, ast.Constant)
        ]
        if not renamed:
            continue
        for cmp in ast.walk(node.test):
            if isinstance(cmp, ast.Compare) and subject.fullmatch(ast.unparse(cmp.left)):
                for op, right in zip(cmp.ops, cmp.comparators):
                    if isinstance(op, (ast.Eq, ast.In)):
                        for name in _constants(right):
                            out.setdefault(name, renamed[0])
    return out


def _function(tree: ast.Module, name: str, class_name: Optional[str] = None) -> ast.FunctionDef:
    scope: Iterable[ast.AST] = tree.body
    if class_name is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    for node in scope:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise ValueError(f"function {name} not found")


def derive_vllm_schema(src: str) -> dict[str, Any]:
    """Schema facts from an unpacked vLLM (``src/vllm/config/speculative.py``)."""
    text = _read(src, "vllm", "config", "speculative.py")
    tree = ast.parse(text)
    fields = _class_fields(tree, "SpeculativeConfig")
    aliases = _literal_aliases(tree)
    m = re.search(r"num_speculative_tokens\s*:\s*int\s*=\s*Field\([^)]*\bgt\s*=\s*(\d+)", text)
    override = _function(tree, "hf_config_override", "SpeculativeConfig")
    draft_types = _renames(override, re.compile(r"hf_config\.model_type"), re.compile(r"hf_config\.model_type"))
    draft_types.update(_renames(override, re.compile(r"hf_config\.architectures\[0\]"), re.compile(r"hf_config\.model_type")))
    return {
        "version": _package_version(src, "vllm"),
        "source": "vllm/config/speculative.py",
        "speculative_config_fields": sorted(fields),
        "methods": _flatten_literal("SpeculativeMethod", aliases),
        "mtp_methods": _flatten_literal("MTPModelTypes", aliases),
        "mtp_aliases_rewritten_to_mtp": "replaced with mtp" in text,
        "num_speculative_tokens_greater_than": int(m.group(1)) if m else None,
        "num_speculative_tokens_multiple_of_n_predict": "must be divisible by" in text,
        "mtp_draft_model_type": dict(sorted(draft_types.items())),
    }


def derive_sglang_schema(src: str) -> dict[str, Any]:
    """Schema facts from an unpacked SGLang (``src/sglang/srt/...``)."""
    server_args_text = _read(src, "sglang", "srt", "server_args.py")
    server_args = ast.parse(server_args_text)
    fields = _class_fields(server_args, "ServerArgs")
    spec_info = ast.parse(_read(src, "sglang", "srt", "speculative", "spec_info.py"))
    algorithms = [
        t.id for node in spec_info.body if isinstance(node, ast.ClassDef) and node.name == "SpeculativeAlgorithm"
        for stmt in node.body if isinstance(stmt, ast.Assign) for t in stmt.targets if isinstance(t, ast.Name)
    ]
    alias_func = _function(server_args, "_resolve_speculative_algorithm_alias")
    # ``if speculative_algorithm == "NEXTN" or ...: ... return "EAGLE"`` -> {"NEXTN": "EAGLE", ...}
    alias_names = {
        name: stmt.value.value
        for node in ast.walk(alias_func) if isinstance(node, ast.If)
        for stmt in node.body if isinstance(stmt, ast.Return) and isinstance(stmt.value, ast.Constant)
        for cmp in ast.walk(node.test) if isinstance(cmp, ast.Compare) and ast.unparse(cmp.left) == "speculative_algorithm"
        for right in cmp.comparators for name in _constants(right)
    }
    model_config = ast.parse(_read(src, "sglang", "srt", "configs", "model_config.py"))
    draft = _renames(
        _function(model_config, "_config_draft_model", "ModelConfig"),
        re.compile(r"self\.hf_config\.architectures\[0\]"), re.compile(r"self\.hf_config\.architectures\[0\]"),
    )
    return {
        "version": _package_version(src, "sglang"),
        "source": "sglang/srt/server_args.py, speculative/spec_info.py, configs/model_config.py",
        "server_args_fields": {k: v for k, v in sorted(fields.items()) if SGLANG_FIELDS_KEPT.match(k)},
        "speculative_algorithms": [a for a in algorithms if a != "NONE"],
        # What _resolve_speculative_algorithm_alias turns a name into (NEXTN -> EAGLE).
        "speculative_algorithm_aliases": dict(sorted(alias_names.items())),
        "mtp_draft_architecture": dict(sorted(draft.items())),
        # ServerArgs raises (instead of turning the radix cache off) for speculative decoding on
        # hybrid linear-attention models in the no_buffer mamba mode.
        "hybrid_speculation_rejects_radix_cache": "is not compatible with radix cache when using" in server_args_text,
    }


DEFAULT_SCHEMA_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests", "data", "engine_schema.json"
)


def load_schema(path: str = DEFAULT_SCHEMA_PATH) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# --- checks of an argument dict against a schema ------------------------------------------------------


def _annotation_accepts(annotation: str, value: Any) -> bool:
    optional = annotation.startswith("Optional[") or "None" in annotation.split("|")
    base = annotation[len("Optional["):-1] if annotation.startswith("Optional[") else annotation.split("|")[0].strip()
    if value is None:
        return optional
    kinds = {"int": int, "bool": bool, "str": str, "float": (int, float)}
    if base not in kinds:
        return True  # a type the schema does not model: no claim
    if base == "int" and isinstance(value, bool):
        return False
    return isinstance(value, kinds[base])


def vllm_schema_problems(args: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """What in ``{"speculative_config": {...}}`` vLLM's SpeculativeConfig (per the schema) rejects."""
    spec = args.get("speculative_config")
    if not isinstance(spec, Mapping):
        return ["no speculative_config mapping"]
    problems = [f"unknown SpeculativeConfig field {k!r}" for k in spec if k not in schema["speculative_config_fields"]]
    method = spec.get("method")
    if method not in schema["methods"]:
        problems.append(f"method {method!r} is not one of SpeculativeMethod {schema['methods']}")
    elif method not in schema["mtp_methods"]:
        problems.append(f"method {method!r} is not an MTP method {schema['mtp_methods']}")
    k = spec.get("num_speculative_tokens")
    if isinstance(k, bool) or not isinstance(k, int) or k <= schema["num_speculative_tokens_greater_than"]:
        problems.append(f"num_speculative_tokens={k!r} must be an int > {schema['num_speculative_tokens_greater_than']}")
    return problems


def sglang_schema_problems(args: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """What in a ServerArgs keyword dict SGLang's ServerArgs (per the schema) rejects."""
    fields = schema["server_args_fields"]
    problems = []
    for key, value in args.items():
        if key not in fields:
            problems.append(f"unknown ServerArgs field {key!r}")
        elif not _annotation_accepts(fields[key], value):
            problems.append(f"ServerArgs.{key}: {fields[key]} does not accept {value!r}")
    algorithm = args.get("speculative_algorithm")
    known = set(schema["speculative_algorithms"]) | set(schema["speculative_algorithm_aliases"])
    if not isinstance(algorithm, str) or algorithm.upper() not in known:
        problems.append(f"speculative_algorithm {algorithm!r} is not one of {sorted(known)}")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-src", required=True, help="directory holding the unpacked vllm/ package")
    parser.add_argument("--sglang-src", required=True, help="directory holding the unpacked sglang/ package")
    parser.add_argument("--out", default=DEFAULT_SCHEMA_PATH)
    ns = parser.parse_args(argv)
    schema = {
        "about": "derived by verl_mtp.testing.engine_schema from the engines' source (ast, not imported)",
        "vllm": derive_vllm_schema(ns.vllm_src),
        "sglang": derive_sglang_schema(ns.sglang_src),
    }
    os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"wrote {ns.out}: vllm {schema['vllm']['version']}, sglang {schema['sglang']['version']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
