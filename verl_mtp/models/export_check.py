"""Export completeness: every MTP tensor the megatron model has must leave in an HF export.

An export is a stream of ``(hf_name, tensor)`` pairs (the weights verl sends to the rollout
engine, or the files it writes to ``model/huggingface``). The check classifies the HF names as
MTP with the family's naming (``verl_mtp.models``) and compares them with what the model has:

- exact, when the bridge can name the HF tensors of each megatron ``mtp.*`` parameter (the
  corrected mbridge bridges of ``verl_mtp.models.bridges``: ``expected_mtp_hf_names``) and this
  rank holds the MTP block: the exported MTP names must equal the expected ones, each once;
- structural otherwise (Megatron-Bridge, or a pipeline stage without the MTP block): every
  depth ``0..D-1`` the model has is present, no other depth, every core tensor of each depth
  (norms, projection) and every tensor the HF config's head has (``verl_mtp.models.head_spec``,
  by name), the same tensor names in every depth, nothing twice.

A failure raises :class:`IncompleteMtpExportError` naming the missing / unexpected tensors.

Every rank of a multi-rank export walks the same stream (producing each tensor is collective
over the model-parallel groups) but checks it on its own: the exact check runs only where the
MTP block lives. ``checked_export`` therefore agrees on one verdict over the process group at the
end of the stream (:func:`agree_on_export_verdict`), so a rank whose check fails never leaves the
others waiting in the next collective: every rank raises the same error, naming each failing
rank's missing tensors.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

import torch

from verl_mtp.errors import VerlMtpError, report_loudly
from verl_mtp.megatron.wrappers import unwrap_model
from verl_mtp.models.families import MtpNaming, UnknownFamilyError, detect_family, hf_config_dict, with_depths
from verl_mtp.models.head_spec import check_head, head_spec


class IncompleteMtpExportError(VerlMtpError, RuntimeError):
    """An HF export lacks MTP tensors the model has, or carries ones it does not have."""


def model_mtp_depths(models: Iterable[Any]) -> int:
    """MTP depth count of a megatron model (list of chunks, wrapped or not); 0 without MTP."""
    for chunk in models:
        config = getattr(unwrap_model(chunk), "config", None)
        depths = getattr(config, "mtp_num_layers", None)
        if depths:
            return int(depths)
    return 0


def model_mtp_param_names(models: Iterable[Any]) -> list[str]:
    """The megatron ``mtp.*`` parameter (and buffer) names this rank holds."""
    names = []
    for chunk in models:
        for name in unwrap_model(chunk).state_dict().keys():
            if name.startswith("mtp.") and "_extra_state" not in name:
                names.append(name)
    return names


def check_mtp_export(
    exported_names: list[str],
    naming: MtpNaming,
    depths: int,
    expected: Optional[list[str]] = None,
    where: str = "export",
    hf_config: Optional[dict] = None,
) -> None:
    """Raise IncompleteMtpExportError unless the exported MTP names are complete.

    ``naming`` classifies HF names; ``depths`` is the model's MTP depth count; ``expected``
    (optional) the exact MTP names the export must contain; ``hf_config`` (optional, config.json
    as a dict) gives the whole head's names (``verl_mtp.models.head_spec``) for the check without
    ``expected``.
    """
    mtp = [n for n in exported_names if naming.is_mtp(n)]
    twice = sorted(n for n, c in Counter(mtp).items() if c > 1)
    problems = [f"exported more than once: {twice}"] if twice else []
    if expected is not None:
        problems += _exact_problems(mtp, expected)
    keys = [naming.key(n) for n in mtp]
    found_depths = sorted({d for d, _ in keys if d is not None})
    if found_depths != list(range(depths)) and (expected is None or not problems):
        problems.append(f"MTP depths exported: {found_depths}, the model has depths {list(range(depths))}")
    if expected is None:
        problems += _structural_problems(naming, depths, keys, hf_config)
    if problems:
        raise IncompleteMtpExportError(
            f"incomplete MTP {where} ({naming.family.title}, {depths} depth(s), "
            f"{len(mtp)} MTP tensors exported): " + "; ".join(problems)
        )


def _exact_problems(mtp: list[str], expected: list[str]) -> list[str]:
    """The exported MTP names against the exact list the bridge gives."""
    problems = []
    missing = sorted(set(expected) - set(mtp))
    unexpected = sorted(set(mtp) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} MTP tensor(s): {missing}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} MTP tensor(s): {unexpected}")
    if not missing and not unexpected and len(mtp) != len(expected):
        problems.append(f"{len(mtp)} MTP tensors exported, the model has {len(expected)}")
    return problems


def _structural_problems(naming: MtpNaming, depths: int, keys: list, hf_config: Optional[dict]) -> list[str]:
    """Without an exact list: every core tensor, every tensor the config's head has (by name; the
    tools of verl_mtp.ckpt check shapes too, unless the config cannot give the layout), and the
    same tensors in every depth."""
    problems = []
    present = set(keys)
    absent_core = [naming.name(k) for k in naming.required_keys() if k not in present] if depths else []
    if absent_core:
        problems.append(f"missing core MTP tensor(s): {absent_core}")
    spec = head_spec(naming.family, hf_config, depths) if depths and hf_config is not None else None
    if spec is not None and spec.derivable:
        lacking = [n for n in check_head(spec, naming, {k: None for k in present}).missing
                   if n not in absent_core and naming.depth_of(n) in (None, *range(depths))]
        lacking = [n for n in lacking if not n.endswith(".*")]  # whole depths: reported above
        if lacking:
            problems.append(f"missing MTP tensor(s) the config's head has: {lacking}")
    if not naming.family.projection_shared and depths > 1:
        per_depth = {d: sorted(r for dd, r in keys if dd == d) for d in range(depths)}
        for d, rests in per_depth.items():
            if rests != per_depth[0]:
                lacking = sorted(set(per_depth[0]) - set(rests))
                extra = sorted(set(rests) - set(per_depth[0]))
                problems.append(
                    f"MTP depth {d} differs from depth 0: lacks {[naming.name((d, r)) for r in lacking]}, "
                    f"has extra {[naming.name((d, r)) for r in extra]}"
                )
    return problems


def _expected_names(models: list, bridge: Any, depths: int) -> Optional[list[str]]:
    """The exact MTP names an export must hold, from a bridge that can name them
    (``expected_mtp_hf_names``); None where it cannot (or this rank lacks the MTP block)."""
    namer = getattr(bridge, "expected_mtp_hf_names", None)
    if not callable(namer):
        return None
    if model_mtp_param_names(models):
        all_names = [n for chunk in models for n in unwrap_model(chunk).state_dict().keys() if "_extra_state" not in n]
        return sorted(set(namer(all_names)))
    return [] if depths == 0 else None


class MtpExportChecker:
    """Collects exported names and checks them once the export is over.

    Built from the model chunks of this rank, the bridge and the HF config; ``active`` is False
    (and ``check`` does nothing) when the model has no MTP and the family is unknown.
    """

    def __init__(self, models: list, bridge: Any, hf_config: Any, where: str = "export"):
        self.where = where
        self.depths = model_mtp_depths(models)
        config = hf_config_dict(hf_config)
        try:
            self.family = detect_family(config)
        except UnknownFamilyError:
            self.family = None
        self.config = config
        self.active = self.family is not None
        if not self.active and self.depths:
            report_loudly(
                f"{where} of a model with {self.depths} MTP depth(s) is not checked for completeness: "
                f"config.json names no family verl-mtp knows (model_type={config.get('model_type')!r})"
            )
        self.expected: Optional[list[str]] = _expected_names(models, bridge, self.depths) if self.active else None
        self.names: list[str] = []

    def observe(self, name: str) -> None:
        self.names.append(name)

    def check(self) -> None:
        if not self.active:
            return
        naming = self.family.naming(self.config, self.depths, self.names)
        check_mtp_export(self.names, naming, self.depths, self.expected, where=self.where, hf_config=self.config)


# Default of ``checked_export(group=...)``: the default process group, when one is initialised.
DEFAULT_GROUP = "default"


def _flag_device(group: Any) -> torch.device:
    """Where a collective of ``group`` takes its tensor: the CPU when the group has gloo (verl's
    default group is ``cpu:gloo,cuda:nccl``), else the accelerator its backend drives."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "gloo" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    from verl.utils.device import get_device_id, get_device_name

    return torch.device(get_device_name(), get_device_id())


def agree_on_export_verdict(problem: Optional[str], group: Any = None, where: str = "export") -> None:
    """Raise the same IncompleteMtpExportError on every rank of ``group`` when any rank's
    ``problem`` is not None; return quietly on every rank when none is.

    Collective: every rank of ``group`` must call it. A passing export costs one all-reduce of
    one integer; only a failing one gathers the failing ranks' messages."""
    import torch.distributed as dist

    failed = torch.tensor([0 if problem is None else 1], dtype=torch.int64, device=_flag_device(group))
    dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
    if int(failed.item()) == 0:
        return
    reports: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(reports, (dist.get_rank(), problem), group=group)
    failing = [(rank, text) for rank, text in reports if text is not None]
    by_text: dict[str, list[int]] = {}
    for rank, text in failing:
        by_text.setdefault(text, []).append(rank)
    lines = [f"rank(s) {', '.join(map(str, ranks))}: {text}" for text, ranks in by_text.items()]
    raise IncompleteMtpExportError(
        f"incomplete MTP {where} on {len(failing)} of {len(reports)} rank(s) (every rank stops here):\n  "
        + "\n  ".join(lines)
    )


def _active_group(group: Any) -> Any:
    """The process group to agree over, or None for a local verdict (no process group, one rank)."""
    import torch.distributed as dist

    if group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    resolved = dist.group.WORLD if isinstance(group, str) and group == DEFAULT_GROUP else group
    return resolved if dist.get_world_size(resolved) > 1 else None


def checked_export(
    stream: Iterable, models: list, bridge: Any, hf_config: Any, where: str = "export", group: Any = DEFAULT_GROUP
) -> Iterator:
    """Yield ``stream``'s ``(name, tensor)`` pairs; when it is exhausted, check MTP completeness.

    ``group``: the ranks that walk this export together (every one of them must exhaust the
    stream); they agree on the verdict before any of them returns, so a failure raises on all of
    them. ``DEFAULT_GROUP`` (default) is the default process group when torch.distributed is
    initialised with more than one rank; ``None`` checks locally only."""
    group = _active_group(group)
    problem = None
    checker = None
    try:
        checker = MtpExportChecker(models, bridge, hf_config, where=where)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run fails on every rank, not just here
        if group is None:
            raise
        problem = f"the MTP {where} check could not start: {type(exc).__name__}: {exc}"
    for item in stream:
        if checker is not None:
            checker.observe(item[0])
        yield item
    if checker is not None:
        try:
            checker.check()
        except Exception as exc:  # noqa: BLE001 - IncompleteMtpExportError or a failing check
            if group is None:
                raise
            problem = str(exc) if isinstance(exc, IncompleteMtpExportError) else f"{type(exc).__name__}: {exc}"
    if group is not None:
        agree_on_export_verdict(problem, group, where=where)


def stored_tensor_names(hf_dir: str) -> list[str]:
    """Tensor names the safetensors files of an HF checkpoint directory really hold (an index
    can list tensors whose shard was never written)."""
    from safetensors import safe_open

    names = []
    for file in sorted(os.listdir(hf_dir)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(hf_dir, file), framework="pt") as f:
                names.extend(f.keys())
    return names


def index_problems(hf_dir: str) -> list[str]:
    """Names ``model.safetensors.index.json`` lists in a file that lacks them (or is missing)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return []
    from safetensors import safe_open

    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    held: dict[str, set] = {}
    problems = []
    for name, file in weight_map.items():
        if file not in held:
            path = os.path.join(hf_dir, file)
            if os.path.exists(path):
                with safe_open(path, framework="pt") as f:
                    held[file] = set(f.keys())
            else:
                held[file] = set()
        if name not in held[file]:
            problems.append(f"{name} (index says {file})")
    return problems


def check_saved_hf_dir(hf_dir: str, models: list, bridge: Any, hf_config: Any) -> None:
    """Check a written HF checkpoint directory holds the model's MTP head completely."""
    checker = MtpExportChecker(models, bridge, hf_config, where=f"HF checkpoint {hf_dir}")
    for name in stored_tensor_names(hf_dir):
        checker.observe(name)
    checker.check()
    listed_not_written = index_problems(hf_dir)
    if listed_not_written:
        raise IncompleteMtpExportError(
            f"HF checkpoint {hf_dir}: model.safetensors.index.json lists {len(listed_not_written)} tensor(s) "
            f"no shard holds: {listed_not_written[:20]}"
        )


def finish_hf_save(hf_dir: str, models: list, bridge: Any, hf_config: Any, group: Any = DEFAULT_GROUP) -> None:
    """After an HF save: rank 0 makes config.json declare the model's MTP depths and checks the
    written files (``check_saved_hf_dir``); every rank of ``group`` (all of them save together)
    gets its verdict, so a failure raises on each of them, not on rank 0 alone."""
    import torch.distributed as dist

    group = _active_group(group)
    problem = None
    if group is None or dist.get_rank(group) == 0:
        try:
            # verl writes its HF config object, whose depth count can differ (mtp_num_layers override)
            write_config_depths(hf_dir, model_mtp_depths(models))
            check_saved_hf_dir(hf_dir, models, bridge, hf_config)
        except Exception as exc:  # noqa: BLE001 - every rank raises it below
            if group is None:
                raise
            problem = str(exc) if isinstance(exc, IncompleteMtpExportError) else f"{type(exc).__name__}: {exc}"
    if group is not None:
        agree_on_export_verdict(problem, group, where=f"HF checkpoint {hf_dir}")


def write_config_depths(hf_dir: str, depths: int) -> bool:
    """Make ``hf_dir/config.json`` declare ``depths`` MTP depths (where the family keeps the key).

    verl writes the config object it holds, whose depth count can differ from the model's
    (``mtp.mtp_num_layers`` override; zeroed when MTP is off). Returns True if it changed."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        config = json.load(f)
    try:
        family = detect_family(config)
    except UnknownFamilyError:
        return False
    updated = with_depths(config, depths, config, family)
    if updated == config:
        return False
    with open(path, "w") as f:
        json.dump(updated, f, indent=2)
        f.write("\n")
    return True
