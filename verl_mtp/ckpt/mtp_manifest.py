"""MTP-aware Megatron checkpoints: a manifest written with every save, checked on every load.

verl's ``MegatronCheckpointManager`` saves whatever the model's sharded state dict (or the HF
bridge) holds and loads whatever the new model asks for; nothing notices when the MTP head is
missing, incomplete or of another shape, and OCC's state is not saved at all. The
``mtp_checkpoint`` patch (verl_mtp/patches/checkpoint.py) runs the functions below around the manager's
save and load:

save (all ranks)       ``prepare_mtp_save``: list the model's ``mtp.*`` parameters, check each
                       is in the sharded state dict, gather them (and OCC's state) from all ranks;
                       remove a stale manifest.
finalize (rank 0)      ``commit_mtp_manifest``: after every shard is written (also for async
                       saves) and before verl writes ``ckpt_contents.json``: check the files hold
                       every MTP tensor (dist checkpoint: key and global shape from its metadata;
                       HF export: verl_mtp.models.export_check), then write ``mtp_manifest.json``
                       atomically. A missing tensor raises, so neither file claims the save.
load (all ranks)       ``check_mtp_resume``: compare the model being built with the manifest and
                       the files; missing / mis-shaped tensors or another depth count raise with
                       their names, before anything is loaded. A checkpoint without any MTP tensor
                       loads into an MTP run only with ``mtp_allow_fresh_head_on_resume=True``
                       (``fresh_head_load``: everything else loads, the head keeps its fresh init).
after load             ``finish_mtp_resume``: restore OCC's state into the actor's policy loss.

Decisions that depend on a rank's pipeline stage use information gathered from all ranks, so
every rank raises the same error instead of some waiting in a collective. Megatron-FSDP's
combined checkpoint is not checked (a warning says so).

The manifest (``mtp_manifest.json`` at the checkpoint root, next to ``ckpt_contents.json``)::

    {"format": "verl-mtp/mtp-manifest", "schema_version": 1, "global_step": 12,
     "num_depths": 2,
     "parameters": {"mtp.layers.0.eh_proj.weight": {"shape": [32, 64], "dtype": "torch.bfloat16"}, ...},
     "config": {"mtp_training_mode": "joint", "mtp_loss_type": "rl", "mtp_coef_mode": "occ", ...},
     "occ": [{"last_off_policy": 0.31, "ema": null}, ...] | null,
     "saved_in": {"dist_ckpt": "model/dist_ckpt" | null, "huggingface": "model/huggingface" | null},
     "versions": {"verl-mtp": ..., "verl": ..., "megatron-core": ..., "torch": ...}}

Parameter names are megatron-core's checkpoint keys (``ShardedTensor.key``) and shapes are global
(independent of tensor/pipeline parallel sizes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from verl_mtp.errors import VerlMtpError, report_loudly
from verl_mtp.megatron.wrappers import unwrap_model

logger = logging.getLogger(__name__)

MANIFEST_NAME = "mtp_manifest.json"
MANIFEST_FORMAT = "verl-mtp/mtp-manifest"
SCHEMA_VERSION = 1
# The engine patch attaches the run's ExtendedMtpConfig to the manager under this attribute.
MTP_CONFIG_ATTR = "verl_mtp_config"
# What prepare_mtp_save leaves on the manager for commit_mtp_manifest: {checkpoint dir: manifest}.
# Keyed by directory because with async_save a save's finalize can run after the next save began.
_PENDING_ATTR = "_verl_mtp_pending_manifests"

MTP_PREFIX = "mtp."
_DEPTH = re.compile(r"^mtp\.layers\.(\d+)\.")
# The ExtendedMtpConfig fields recorded in the manifest (how the head was trained).
RECORDED_CONFIG_FIELDS = (
    "enable", "enable_train", "enable_rollout", "detach_encoder", "mtp_training_mode", "mtp_loss_type",
    "mtp_coef_mode", "mtp_loss_scaling_factor", "mtp_step_weight_beta", "mtp_num_layers", "occ_scale",
    "occ_eps", "occ_ema_decay", "occ_coef_min", "occ_coef_max", "occ_on_policy_coef", "occ_scope",
)


class MtpCheckpointError(VerlMtpError, RuntimeError):
    """An MTP checkpoint problem; the message names the tensors, the checkpoint and the fix."""


@dataclass(frozen=True)
class MtpTensor:
    """One MTP tensor as a checkpoint stores it: megatron's checkpoint key and its global shape."""

    key: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


def depth_of(key: str) -> int | None:
    """0-based MTP depth of a checkpoint key ``mtp.layers.{k}...`` (None for other keys)."""
    match = _DEPTH.match(key)
    return int(match.group(1)) if match else None


def _shown(names, limit: int = 20) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --- the live model ---------------------------------------------------------------------------


def _sharded_tensors(entry) -> list:
    """The ShardedTensors a sharded-state-dict entry saves (a factory, e.g. SwiGLU's, builds them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, ShardedTensor):
        return [entry]
    if isinstance(entry, ShardedTensorFactory):
        built = entry.build()
        if isinstance(built, dict):
            built = list(built.values())
        elif not isinstance(built, (list, tuple)):
            built = [built]
        return [t for b in built for t in _sharded_tensors(b)]
    return []


def live_mtp_tensors(manager) -> tuple[dict[str, MtpTensor], list[str]]:
    """This rank's MTP tensors as the manager's model sharded state dict saves them.

    Returns (checkpoint key -> MtpTensor, names of ``mtp.*`` parameters the sharded state dict
    does not hold). The parameters are the ground truth: a parameter missing from the sharded
    state dict would be silently left out of a dist checkpoint.
    """
    chunks = manager.model if isinstance(manager.model, (list, tuple)) else [manager.model]
    if not any(any(n.startswith(MTP_PREFIX) for n, _ in unwrap_model(c).named_parameters()) for c in chunks):
        return {}, []
    sharded = manager._build_model_sharded_state_dict(manager._build_sharded_state_dict_metadata())
    tensors: dict[str, MtpTensor] = {}
    not_sharded: list[str] = []
    for index, chunk in enumerate(chunks):
        model = unwrap_model(chunk)
        chunk_sd = sharded["model" if len(chunks) == 1 else f"model{index}"]
        for name, param in model.named_parameters():
            if not name.startswith(MTP_PREFIX):
                continue
            built = _sharded_tensors(chunk_sd.get(name))
            if not built:
                not_sharded.append(name)
            for sh in built:
                tensors[sh.key] = MtpTensor(sh.key, tuple(int(d) for d in sh.global_shape), str(param.dtype))
    return tensors, not_sharded


def _gather(obj: Any) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _merge_ranks(per_rank: list[dict[str, MtpTensor]]) -> dict[str, MtpTensor]:
    merged: dict[str, MtpTensor] = {}
    for tensors in per_rank:
        for key, tensor in tensors.items():
            seen = merged.setdefault(key, tensor)
            if seen.shape != tensor.shape:
                raise MtpCheckpointError(
                    f"ranks disagree on the global shape of MTP tensor {key}: "
                    f"{list(seen.shape)} vs {list(tensor.shape)}"
                )
    return dict(sorted(merged.items()))


def live_depths(manager) -> int:
    """The number of MTP depths the model being built has (the TransformerConfig's, global)."""
    return int(getattr(manager.transformer_config, "mtp_num_layers", None) or 0)


def manager_mtp_config(manager):
    """The run's ExtendedMtpConfig (attached by the engine patch); defaults when used standalone."""
    from verl_mtp.config import as_extended

    return as_extended(getattr(manager, MTP_CONFIG_ATTR, None))


# --- OCC state --------------------------------------------------------------------------------


def current_occ_state() -> list[dict] | None:
    """OCC's per-depth state held by this process's actor loss, or None (no OCC ran here)."""
    from verl_mtp.loss import current_policy_loss

    installed = current_policy_loss()
    return None if installed is None else installed.occ_state_dict()


def restore_occ_state(state: list[dict]) -> bool:
    """Hand ``state`` to this process's actor loss; False when no verl-mtp loss is installed."""
    from verl_mtp.loss import current_policy_loss

    installed = current_policy_loss()
    if installed is None:
        return False
    installed.load_occ_state_dict(state)
    return True


# --- the files --------------------------------------------------------------------------------


def dist_ckpt_tensors(dist_ckpt_dir: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> global shape of every tensor a dist checkpoint directory holds."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(dist_ckpt_dir).read_metadata()
    return {
        key: tuple(int(d) for d in meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def has_dist_ckpt(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def compare_tensors(expected: dict[str, MtpTensor], found: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(missing keys, ``key: expected [..], found [..]`` shape mismatches) of ``expected`` in ``found``."""
    missing = [k for k in expected if k not in found]
    mismatched = [
        f"{k}: expected {list(t.shape)}, found {list(found[k])}"
        for k, t in expected.items()
        if k in found and tuple(found[k]) != t.shape
    ]
    return missing, mismatched


def hf_mtp_problems(hf_dir: str, depths: int) -> tuple[list[str], int]:
    """(missing MTP tensors, MTP tensors found) of a Hugging Face export, by the family's naming."""
    from verl_mtp.ckpt.checkpoint import completeness, open_checkpoint

    ckpt = open_checkpoint(hf_dir, role="checkpoint")
    missing, _ = completeness(ckpt)
    if ckpt.depths != depths:
        missing.insert(0, f"{depths} MTP depth(s) (its config.json declares {ckpt.depths})")
    return missing, len(ckpt.mtp)


def read_manifest(local_path: str) -> dict | None:
    path = os.path.join(local_path, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise MtpCheckpointError(f"{path} is unreadable ({exc}); expected a verl-mtp MTP manifest") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise MtpCheckpointError(f"{path} is not a verl-mtp MTP manifest (format {MANIFEST_FORMAT!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise MtpCheckpointError(
            f"{path} has schema_version {manifest.get('schema_version')!r}; this verl-mtp reads {SCHEMA_VERSION}"
        )
    return manifest


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is either absent or complete: a temporary
    file in the same directory, fsynced, then renamed over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _versions() -> dict[str, str]:
    from verl_mtp.version import installed_versions

    return {k: v for k, v in installed_versions().items() if k in ("verl-mtp", "verl", "megatron-core", "torch")}


# --- save ---------------------------------------------------------------------------------


def _megatron_fsdp_unchecked(manager, verb: str) -> bool:
    # Megatron-FSDP writes one combined DTensor checkpoint whose key layout this module does not read.
    if not getattr(manager, "use_megatron_fsdp", False):
        return False
    report_loudly(f"Megatron-FSDP checkpoint {verb} WITHOUT MTP checks or {MANIFEST_NAME}")
    return True


def _key(local_path: str) -> str:
    # verl's save makes a relative path absolute (against the working directory) before finalize
    return os.path.abspath(local_path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def prepare_mtp_save(manager, local_path: str, global_step: int) -> None:
    """All ranks, before verl writes anything: collect what the manifest will promise.

    Raises when an ``mtp.*`` parameter is not in the model's sharded state dict (verl would save
    the checkpoint without it).
    """
    pending_saves = manager.__dict__.setdefault(_PENDING_ATTR, {})
    pending_saves.pop(_key(local_path), None)
    if _megatron_fsdp_unchecked(manager, "saved"):
        return
    if _rank() == 0:  # a manifest left by an earlier save to this directory must not vouch for this one
        stale = os.path.join(local_path, MANIFEST_NAME)
        if os.path.exists(stale):
            os.remove(stale)
    local, not_sharded = live_mtp_tensors(manager)
    mtp = manager_mtp_config(manager)
    occ = current_occ_state() if mtp.uses_occ else None
    gathered = _gather({"tensors": local, "not_sharded": not_sharded, "occ": occ})
    not_sharded = sorted({n for g in gathered for n in g["not_sharded"]})
    if not_sharded:
        raise MtpCheckpointError(
            f"MTP parameter(s) {_shown(not_sharded)} are not in the model's sharded state dict, so the "
            f"checkpoint {local_path} would not hold them; nothing was saved"
        )
    tensors = _merge_ranks([g["tensors"] for g in gathered])
    depths = live_depths(manager)
    if not tensors:
        if depths:
            raise MtpCheckpointError(
                f"the TransformerConfig declares mtp_num_layers={depths} but no rank holds an mtp.* parameter; "
                f"the checkpoint {local_path} would have no MTP head"
            )
        return  # not an MTP model: nothing to promise
    occ_states = [g["occ"] for g in gathered if g["occ"]]
    pending_saves[_key(local_path)] = {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "global_step": int(global_step),
        "num_depths": depths,
        "parameters": {k: t.to_json() for k, t in tensors.items()},
        # in the config for the record; the tensors above are what loading checks
        "config": {f.name: getattr(mtp, f.name) for f in fields(mtp) if f.name in RECORDED_CONFIG_FIELDS},
        # OCC's lambda is global (all-reduced sums), so every rank that computed it holds the same state
        "occ": occ_states[0] if occ_states else None,
        "saved_in": {
            "dist_ckpt": "model/dist_ckpt" if manager.should_save_dist_ckpt_model else None,
            "huggingface": "model/huggingface" if manager.should_save_hf_model else None,
        },
        "versions": _versions(),
    }


def commit_mtp_manifest(manager, local_path: str) -> None:
    """Rank 0, after every shard of the save is written: verify the files, write the manifest.

    Runs before verl writes ``ckpt_contents.json``; raising here leaves neither file behind.
    """
    pending = manager.__dict__.get(_PENDING_ATTR, {}).pop(_key(local_path), None)
    if pending is None or _rank() != 0:
        return
    expected = {k: MtpTensor(k, tuple(v["shape"]), v["dtype"]) for k, v in pending["parameters"].items()}
    problems: list[str] = []
    if pending["saved_in"]["dist_ckpt"]:
        dist_dir = os.path.join(local_path, pending["saved_in"]["dist_ckpt"])
        missing, mismatched = compare_tensors(expected, dist_ckpt_tensors(dist_dir))
        problems += [f"{k} (missing from {dist_dir})" for k in missing]
        problems += [f"{m} (in {dist_dir})" for m in mismatched]
    if pending["saved_in"]["huggingface"]:
        # Also run by the mtp_complete_export patch right after the bridge writes; repeated here
        # because the manifest vouches for the files. It reads safetensors headers only.
        problems += hf_export_problems(manager, os.path.join(local_path, pending["saved_in"]["huggingface"]))
    if problems:
        raise MtpCheckpointError(
            f"the checkpoint {local_path} lacks MTP tensor(s) the model has: {_shown(problems)}; "
            f"{MANIFEST_NAME} and ckpt_contents.json were not written, so this save is not complete"
        )
    write_json_atomic(os.path.join(local_path, MANIFEST_NAME), pending)
    logger.info("verl-mtp: wrote %s with %d MTP tensors", os.path.join(local_path, MANIFEST_NAME), len(expected))


# --- load ---------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    manifest: dict | None
    fresh_head: bool  # load everything but the MTP head, which keeps its fresh initialisation


def check_mtp_resume(manager, local_path: str) -> ResumePlan:
    """All ranks, before verl loads: decide whether this checkpoint may seed this model's MTP head.

    Raises MtpCheckpointError naming every missing or mis-shaped MTP tensor, or a depth mismatch.
    """
    if _megatron_fsdp_unchecked(manager, "loaded"):
        return ResumePlan(manifest=None, fresh_head=False)
    manifest = read_manifest(local_path)
    local, _ = live_mtp_tensors(manager) if manager.should_load_model else ({}, [])
    expected = _merge_ranks(_gather(local))
    depths = live_depths(manager)
    plan = ResumePlan(manifest=manifest, fresh_head=False)
    if not manager.should_load_model:
        return plan
    if manifest is not None and depths and manifest["num_depths"] != depths:
        raise MtpCheckpointError(
            f"checkpoint {local_path} was saved with {manifest['num_depths']} MTP depth(s) but this model has "
            f"{depths}; set actor_rollout_ref.model.mtp.mtp_num_layers to {manifest['num_depths']} "
            f"(or load a matching checkpoint)"
        )

    if manager.should_load_dist_ckpt_model:
        plan.fresh_head = _check_dist_resume(manager, local_path, manifest, expected, depths)
    elif manager.should_load_hf_model and expected:
        plan.fresh_head = _check_hf_resume(manager, local_path, manifest, depths)
    return plan


def _check_dist_resume(manager, local_path: str, manifest: dict | None, expected: dict, depths: int) -> bool:
    """The dist checkpoint against the model's MTP tensors (and the manifest's); True: keep a fresh head."""
    label = f"checkpoint {local_path}"
    dist_dir = os.path.join(local_path, "model", "dist_ckpt")
    found = dist_ckpt_tensors(dist_dir) if has_dist_ckpt(dist_dir) else {}
    found_mtp = {k: s for k, s in found.items() if k.startswith(MTP_PREFIX)}
    if not expected:
        if found_mtp:
            report_loudly(
                f"{label} holds {len(found_mtp)} MTP tensors but this model has no MTP head; they are not loaded"
            )
        return False
    if not found_mtp and manifest is None:
        return _allow_fresh_head(manager, label, depths)
    missing, mismatched = compare_tensors(expected, found)
    extra_depths = sorted({d for k in found_mtp if (d := depth_of(k)) is not None and d >= depths})
    problems = [f"{k} (missing)" for k in missing] + [f"{m} (shape)" for m in mismatched]
    if extra_depths:
        problems.append(
            f"MTP depth(s) {', '.join(str(d) for d in extra_depths)} in the checkpoint beyond this model's {depths}"
        )
    if manifest is not None:
        manifest_missing, manifest_mismatched = compare_tensors(
            expected, {k: tuple(v["shape"]) for k, v in manifest["parameters"].items()}
        )
        problems += [f"{k} (not in {MANIFEST_NAME})" for k in manifest_missing]
        problems += [f"{m} (per {MANIFEST_NAME})" for m in manifest_mismatched]
    if problems:
        raise MtpCheckpointError(
            f"{label} cannot seed this model's MTP head: {_shown(problems)}. Refusing to load rather than "
            f"leave these tensors at random initialisation"
        )
    return False


def _check_hf_resume(manager, local_path: str, manifest: dict | None, depths: int) -> bool:
    """The Hugging Face export against the model's MTP head; True: keep a fresh head."""
    label = f"checkpoint {local_path}"
    hf_dir = os.path.join(local_path, "model", "huggingface")
    missing, found_count = hf_mtp_problems(hf_dir, depths)
    if found_count == 0 and manifest is None:
        return _allow_fresh_head(manager, label, depths)
    # The exact check (every MTP tensor this model's bridge reads), the one exports are checked
    # with; its verdict can depend on the rank's pipeline stage, so all ranks share theirs.
    per_rank = _gather(hf_export_problems(manager, hf_dir))
    problems = [f"{hf_dir} lacks {_shown(missing)}"] if missing else []
    problems += sorted({problem for rank in per_rank for problem in rank})
    if problems:
        raise MtpCheckpointError(
            f"{label} cannot seed this model's MTP head: {'; '.join(problems)}. Refusing to load "
            f"rather than leave these tensors at random initialisation"
        )
    return False


def hf_export_problems(manager, hf_dir: str) -> list[str]:
    """verl_mtp.models.export_check's verdict on ``hf_dir`` for this rank's model ([] = complete)."""
    if getattr(manager, "peft_cls", None) is not None:
        return []  # adapter checkpoints carry no base weights
    from verl_mtp.models.export_check import IncompleteMtpExportError, check_saved_hf_dir

    try:
        check_saved_hf_dir(hf_dir, manager.model, manager.bridge, manager.hf_config)
    except IncompleteMtpExportError as exc:
        return [str(exc)]
    return []


def _allow_fresh_head(manager, label: str, depths: int) -> bool:
    mtp = manager_mtp_config(manager)
    if not mtp.mtp_allow_fresh_head_on_resume:
        raise MtpCheckpointError(
            f"{label} has no MTP tensors (saved without MTP) but this model has {depths} MTP depth(s); loading it "
            f"would leave the MTP head at random initialisation. To do that on purpose set "
            f"actor_rollout_ref.model.mtp.mtp_allow_fresh_head_on_resume=True; otherwise resume from a checkpoint "
            f"saved with MTP"
        )
    if manager.should_load_hf_model and not _bridge_can_skip_mtp(manager):
        raise MtpCheckpointError(
            f"{label} has no MTP tensors; keeping a fresh MTP head while loading the rest through the Hugging Face "
            f"path needs verl's vanilla mbridge (this run uses {type(manager.bridge).__name__}). Either resume with "
            f"use_dist_checkpointing=True, or graft an MTP head into {label}/model/huggingface first "
            f"(verl-mtp ckpt graft) and resume without the opt-in"
        )
    if manager.should_load_optimizer:
        raise MtpCheckpointError(
            f"{label} has no MTP tensors, so its optimizer state does not cover the MTP head's parameters and "
            f"cannot be loaded into this MTP run; set actor_rollout_ref.actor.checkpoint.load_contents to "
            f"['model', 'extra'] (the optimizer starts fresh) together with mtp_allow_fresh_head_on_resume=True"
        )
    report_loudly(
        f"{label} was saved without MTP; mtp_allow_fresh_head_on_resume=True, so the {depths}-depth MTP head "
        f"keeps its fresh initialisation and everything else is loaded from the checkpoint"
    )
    return True


# mbridge's Bridge.load_weights reads the Hugging Face tensors of every name this method maps.
_BRIDGE_NAME_MAP = "_weight_name_mapping_mcore_local_to_global"


def _bridge_can_skip_mtp(manager) -> bool:
    return bool(getattr(manager, "vanilla_bridge", False)) and callable(getattr(manager.bridge, _BRIDGE_NAME_MAP, None))


@contextlib.contextmanager
def fresh_head_load(manager) -> Iterator[None]:
    """While verl loads, leave the MTP head out: the dist checkpoint path requests no MTP entries
    and keeps the model's own MTP tensors when the loaded state dict is applied; the HF path has
    mbridge map (and so read) no MTP parameter."""
    if manager.should_load_hf_model and not manager.should_load_dist_ckpt_model:
        bridge = manager.bridge
        name_map = getattr(bridge, _BRIDGE_NAME_MAP)

        def without_mtp_names(model, *args, **kwargs):
            return {k: v for k, v in name_map(model, *args, **kwargs).items() if not k.startswith(MTP_PREFIX)}

        setattr(bridge, _BRIDGE_NAME_MAP, without_mtp_names)
        try:
            yield
        finally:
            delattr(bridge, _BRIDGE_NAME_MAP)  # back to the class's method
        return
    build = manager._build_model_sharded_state_dict
    chunks = manager.model if isinstance(manager.model, (list, tuple)) else [manager.model]

    def without_mtp(metadata):
        built = build(metadata)
        return {name: {k: v for k, v in sd.items() if not k.startswith(MTP_PREFIX)} for name, sd in built.items()}

    def keeping_own_mtp(chunk):
        original = chunk.load_state_dict

        def load_state_dict(state_dict, strict=True):
            own = {k: v for k, v in chunk.state_dict().items() if k.startswith(MTP_PREFIX)}
            return original({**own, **state_dict}, strict=strict)

        return original, load_state_dict

    saved = [(chunk, *keeping_own_mtp(chunk)) for chunk in chunks]
    manager._build_model_sharded_state_dict = without_mtp
    for chunk, _, replacement in saved:
        chunk.load_state_dict = replacement
    try:
        yield
    finally:
        del manager._build_model_sharded_state_dict  # back to the class's method
        for chunk, _, _ in saved:
            del chunk.load_state_dict  # back to the class's method


def finish_mtp_resume(manager, plan: ResumePlan) -> None:
    """After verl loaded: restore OCC's state when the checkpoint has it and this run uses OCC."""
    occ = (plan.manifest or {}).get("occ")
    if not manager_mtp_config(manager).uses_occ:
        return
    if not occ:
        logger.info("verl-mtp: the checkpoint holds no OCC state; OCC starts fresh")
        return
    if not restore_occ_state(occ):
        raise MtpCheckpointError(
            "the checkpoint holds OCC state but this process has no verl-mtp actor loss to restore it into "
            "(the mtp_policy_loss patch is not active here; check the [verl-mtp] lines in this worker's log)"
        )
    logger.info("verl-mtp: restored OCC state for %d MTP depth(s)", len(occ))
