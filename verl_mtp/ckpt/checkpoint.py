"""A Hugging Face safetensors checkpoint directory, read header-only, with its MTP tensors located."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from verl_mtp.ckpt.files import SafetensorsFormatError, TensorEntry, read_safetensors_header
from verl_mtp.errors import VerlMtpError
from verl_mtp.models import Family, MtpKey, MtpNaming, UnknownFamilyError, depth_key_location, detect_family
from verl_mtp.models import mtp_depths, text_config
from verl_mtp.models.head_spec import HeadCheck, check_head, head_spec

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CkptError(VerlMtpError):
    """Bad, unreadable or incompatible input. The message names the bad thing and what was expected;
    the CLI prints it and exits 2."""


@dataclass
class HFCheckpoint:
    path: str
    role: str  # how messages name it: "VERIFIER", "DONOR", ...
    config: dict
    family: Family
    depths: int
    naming: MtpNaming
    index: Optional[dict]  # the parsed index; None for a single-file checkpoint
    shards: list[str]  # shard file names, in order
    tensors: dict[str, TensorEntry]  # the checkpoint's tensors (the index's weight_map, or the file)
    shard_tensors: dict[str, dict[str, TensorEntry]]  # every tensor each shard file holds
    shard_metadata: dict[str, Optional[dict]]
    unindexed: dict[str, list[str]] = field(default_factory=dict)  # shard -> tensors not in the index
    mtp: dict[MtpKey, str] = field(default_factory=dict)  # MTP key -> tensor name

    @property
    def label(self) -> str:
        return f"{self.role} {self.path}"

    def shard_of(self, name: str) -> str:
        return os.path.basename(self.tensors[name].path)

    def depth_key(self) -> Optional[str]:
        where = depth_key_location(self.config)
        if where is None:
            return None
        parent, key = where
        return f"{parent}.{key}" if parent else key

    def hidden_size(self) -> Optional[int]:
        value = text_config(self.config).get("hidden_size")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def drafter_shared(self) -> list[str]:
        return sorted(n for n in self.tensors if self.naming.is_drafter_shared(n))

    def embedding(self) -> Optional[TensorEntry]:
        """The trunk's token embedding (``...embed_tokens.weight`` outside the MTP head)."""
        names = [n for n in self.drafter_shared() if n.endswith("embed_tokens.weight")]
        return self.tensors[min(names, key=len)] if names else None


def _read_config(path: str, role: str) -> dict:
    # Plain json: reading a checkpoint must not import verl (``verl-mtp ckpt`` starts fast).
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CkptError(f"{role} {path} has no config.json; expected a Hugging Face checkpoint directory")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CkptError(f"{role} {path}/config.json is unreadable: {exc}; expected a JSON object") from exc
    if not isinstance(config, dict):
        raise CkptError(f"{role} {path}/config.json is not a JSON object")
    return config


def _read_header(path: str, label: str):
    try:
        return read_safetensors_header(path)
    except SafetensorsFormatError as exc:
        raise CkptError(f"{label}: {exc}") from exc
    except OSError as exc:
        raise CkptError(f"{label}: cannot read {path}: {exc}") from exc


def open_checkpoint(path: str, role: str = "checkpoint") -> HFCheckpoint:
    """Read ``config.json``, the index and every shard header of a checkpoint directory; locate its
    MTP tensors. Raises CkptError for anything unreadable or inconsistent."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    label = f"{role} {path}"
    if not os.path.isdir(path):
        raise CkptError(f"{label} is not a directory; expected a Hugging Face checkpoint directory")
    config = _read_config(path, role)
    try:
        family = detect_family(config)
    except UnknownFamilyError as exc:
        raise CkptError(f"{label}: {exc}") from exc
    index, weight_map, shards = _read_index(path, label)
    shard_tensors: dict[str, dict[str, TensorEntry]] = {}
    shard_metadata: dict[str, Optional[dict]] = {}
    for shard in shards:
        header = _read_header(os.path.join(path, shard), label)
        shard_tensors[shard] = header.tensors
        shard_metadata[shard] = header.metadata
    tensors, unindexed = _tensor_table(weight_map, shard_tensors, label)
    depths = mtp_depths(config)
    try:
        naming = family.naming(config, depths, tensors.keys())
    except ValueError as exc:
        raise CkptError(f"{label}: {exc}") from exc
    return HFCheckpoint(
        path=path, role=role, config=config, family=family, depths=depths, naming=naming, index=index,
        shards=shards, tensors=tensors, shard_tensors=shard_tensors, shard_metadata=shard_metadata,
        unindexed=unindexed, mtp=_locate_mtp(tensors, naming, label),
    )


def _read_index(path: str, label: str) -> tuple[Optional[dict], Optional[dict[str, str]], list[str]]:
    """(index, its weight_map, shard files) of a sharded checkpoint; (None, None, [model.safetensors])
    of a single-file one."""
    has_single = os.path.isfile(os.path.join(path, SINGLE_NAME))
    if not os.path.isfile(os.path.join(path, INDEX_NAME)):
        if has_single:
            return None, None, [SINGLE_NAME]
        raise CkptError(f"{label} has neither {INDEX_NAME} nor {SINGLE_NAME}; expected safetensors weights")
    try:
        with open(os.path.join(path, INDEX_NAME)) as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise CkptError(f"{label}: {INDEX_NAME} is unreadable: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CkptError(f'{label}: {INDEX_NAME} has no "weight_map" object of tensor name -> shard file')
    shards = sorted(set(weight_map.values()))
    if has_single and shards != [SINGLE_NAME]:
        raise CkptError(_stale_index_message(label, shards, path))
    missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if missing:
        raise CkptError(f"{label}: shard file(s) named in {INDEX_NAME} are missing: {', '.join(missing)}")
    return index, weight_map, shards


def _tensor_table(weight_map: Optional[dict[str, str]], shard_tensors: dict[str, dict[str, TensorEntry]],
                  label: str) -> tuple[dict[str, TensorEntry], dict[str, list[str]]]:
    """(the checkpoint's tensors, shard -> the tensors it holds that the index does not list)."""
    if weight_map is None:
        return dict(shard_tensors[SINGLE_NAME]), {}
    absent = [f"{n} (in {s})" for n, s in weight_map.items() if n not in shard_tensors[s]]
    if absent:
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise CkptError(f"{label}: {INDEX_NAME} names tensors their shard does not hold: {shown}")
    tensors = {n: shard_tensors[s][n] for n, s in weight_map.items()}
    unindexed = {}
    for shard, held in shard_tensors.items():
        extra = sorted(n for n in held if weight_map.get(n) != shard)
        if extra:
            unindexed[shard] = extra
    return tensors, unindexed


def _locate_mtp(tensors: dict[str, TensorEntry], naming: MtpNaming, label: str) -> dict[MtpKey, str]:
    """MTP key -> tensor name; two names with one key are refused."""
    mtp: dict[MtpKey, str] = {}
    for name in tensors:
        key = naming.key(name)
        if key is None:
            continue
        if key in mtp:
            raise CkptError(
                f"{label}: tensors {mtp[key]} and {name} are the same {naming.family.title} MTP tensor "
                f"(depth {key[0]}, {key[1]}); expected one"
            )
        mtp[key] = name
    return mtp


def _stale_index_message(label: str, shards: list[str], path: str) -> str:
    absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    shown = ", ".join(shards[:4]) + (f" and {len(shards) - 4} more" if len(shards) > 4 else "")
    detail = f"{INDEX_NAME} maps the weights to {shown}"
    if absent:
        detail += f" ({len(absent)} of them missing: {', '.join(absent[:4])})"
    return (
        f"{label} holds both {SINGLE_NAME} and {INDEX_NAME}, and {detail}, not to {SINGLE_NAME}. Loaders "
        f"disagree on which one wins (transformers reads {SINGLE_NAME}, vLLM follows the index), so which "
        f"weights this checkpoint has is ambiguous; remove the stale one of the two files"
    )


def mtp_shapes(ckpt: HFCheckpoint) -> dict[MtpKey, tuple[int, ...]]:
    return {key: ckpt.tensors[name].shape for key, name in ckpt.mtp.items()}


def head_check(ckpt: HFCheckpoint, config: Optional[dict] = None, depths: Optional[int] = None) -> HeadCheck:
    """The whole-head check (``verl_mtp.models.head_spec``) of ``ckpt``'s MTP tensors against the
    head ``config`` (default: the checkpoint's own config.json) calls for with ``depths`` depths
    (default: the checkpoint's declared count)."""
    config = ckpt.config if config is None else config
    depths = ckpt.depths if depths is None else depths
    spec = head_spec(ckpt.family, config, depths)
    return check_head(spec, ckpt.naming, mtp_shapes(ckpt))


def completeness(ckpt: HFCheckpoint) -> tuple[list[str], list[str]]:
    """(missing, unexpected) of the whole-head check: config problems and missing tensors, then
    tensors the head should not have (beyond the declared depths included); shapes are not in it."""
    check = head_check(ckpt)
    return check.config + check.missing, check.unexpected
