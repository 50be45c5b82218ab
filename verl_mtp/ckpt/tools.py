"""The ``verl-mtp ckpt`` operations: inspect, extract, stitch, graft; and their text / JSON reports.

Every writing operation builds its output in a sibling staging directory and renames it to OUT
only when everything is written (``files.staged_output``); shards that hold no MTP tensor are
copied as files, byte for byte; the other shards are rewritten tensor by tensor.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from verl_mtp.ckpt.checkpoint import INDEX_NAME, SINGLE_NAME, CkptError, HFCheckpoint, head_check, open_checkpoint
from verl_mtp.ckpt.files import (
    OWNER_MARKER,
    TensorEntry,
    copy_file,
    maybe_fail,
    staged_output,
    write_json,
    write_safetensors,
)
from verl_mtp.models import MtpKey, with_depths
from verl_mtp.models.head_spec import HeadCheck, fold_expert_names

EXTRACT_INFO_NAME = "mtp_extract.json"
GRAFT_SHARD_NAME = "model-mtp.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the transformers default, "5GB"
ALLOW_INCOMPLETE_FLAG = "--allow-incomplete-head"
NEW_SHARD_METADATA = {"format": "pt"}


def _natural(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _key_order(key: MtpKey) -> tuple:
    depth, rest = key
    return (-1 if depth is None else depth, _natural(rest))


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1000000"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r} is not a size; expected e.g. 5GB, 500MiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
    if scale is None:
        raise ValueError(f"{text!r}: unknown unit {m.group(2)!r}; expected B, KB, MB, GB, KiB, MiB or GiB")
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"{text!r}: expected a positive size")
    return value


def _tensor_row(ckpt: HFCheckpoint, name: str) -> dict:
    e = ckpt.tensors[name]
    return {"name": name, "shape": list(e.shape), "dtype": e.dtype, "bytes": e.nbytes, "shard": ckpt.shard_of(name)}


# --- inspect -------------------------------------------------------------------------------------


@dataclass
class InspectReport:
    path: str
    family: str
    family_title: str
    model_type: Optional[str]
    depths: int
    depth_key: Optional[str]
    layout: str
    complete: bool
    missing: list[str]
    unexpected: list[str]
    misshapen: list[str]  # "name [shape], expected [shape]"
    config_problems: list[str]  # config.json values the head's layout could not be derived from
    problems_by_depth: dict[str, dict[str, list[str]]]  # "shared" / "0" / ... / "beyond" -> kind -> entries
    beyond_depths: list[str]
    mtp_tensors: int
    mtp_bytes: int
    groups: dict[str, list[dict]]  # "shared" / "0" / "1" ... -> tensor rows
    drafter_shared: list[dict]
    shards: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _group_label(depth: Optional[int]) -> str:
    return "shared" if depth is None else str(depth)


def inspect_loaded(ckpt: HFCheckpoint) -> InspectReport:
    check = head_check(ckpt)
    groups: dict[str, list[dict]] = {}
    for key in sorted(ckpt.mtp, key=_key_order):
        groups.setdefault(_group_label(key[0]), []).append(_tensor_row(ckpt, ckpt.mtp[key]))
    mtp_bytes = sum(ckpt.tensors[n].nbytes for n in ckpt.mtp.values())
    warnings = []
    for shard, names in ckpt.unindexed.items():
        mtp_names = [n for n in names if ckpt.naming.is_mtp(n)]
        note = f"{shard} holds {len(names)} tensor(s) that {INDEX_NAME} does not list (loaders ignore them)"
        if mtp_names:
            note += f", MTP among them: {', '.join(mtp_names[:8])}" + (" ..." if len(mtp_names) > 8 else "")
        warnings.append(note)
    if ckpt.embedding() is None:
        warnings.append("no token embedding (...embed_tokens.weight) outside the MTP head; a drafter needs one")
    warnings += check.notes
    return InspectReport(
        path=ckpt.path, family=ckpt.family.name, family_title=ckpt.family.title,
        model_type=ckpt.config.get("model_type"), depths=ckpt.depths, depth_key=ckpt.depth_key(),
        layout=ckpt.family.layout, complete=check.ok, missing=check.missing, unexpected=check.unexpected,
        misshapen=check.misshapen, config_problems=check.config, problems_by_depth=check.by_depth,
        beyond_depths=check.beyond_depths, mtp_tensors=len(ckpt.mtp), mtp_bytes=mtp_bytes, groups=groups,
        drafter_shared=[_tensor_row(ckpt, n) for n in ckpt.drafter_shared()], shards=list(ckpt.shards),
        warnings=warnings,
    )


def inspect_checkpoint(path: str) -> InspectReport:
    """What MTP head a checkpoint holds and whether it is complete. Raises CkptError when the
    checkpoint is unreadable (no config.json, unknown family, missing or broken shard)."""
    return inspect_loaded(open_checkpoint(path, "checkpoint"))


def _collapse_experts(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(name, "[shape] dtype", count): rows differing only in an experts.{n} index fold into one."""
    folded: dict[tuple[str, str], list[int]] = {}
    order: list[tuple[str, str]] = []
    for row in rows:
        desc = f"[{', '.join(map(str, row['shape']))}] {row['dtype']}"
        m = re.search(r"\.experts\.(\d+)\.", row["name"])
        pattern = row["name"] if m is None else row["name"][: m.start()] + ".experts.{}." + row["name"][m.end():]
        k = (pattern, desc)
        if k not in folded:
            folded[k] = []
            order.append(k)
        if m is not None:
            folded[k].append(int(m.group(1)))
    out = []
    for pattern, desc in order:
        ids = folded[(pattern, desc)]
        if not ids:
            out.append((pattern, desc, 1))
        elif len(ids) == 1:
            out.append((pattern.replace("{}", str(ids[0])), desc, 1))
        else:
            contiguous = sorted(ids) == list(range(min(ids), max(ids) + 1))
            span = f"{{{min(ids)}..{max(ids)}}}" if contiguous else "{" + ",".join(map(str, sorted(ids))) + "}"
            out.append((pattern.replace("{}", span), desc, len(ids)))
    return out


def render_inspect(report: InspectReport) -> str:
    lines = [f"checkpoint   {report.path}"]
    lines.append(f"family       {report.family_title} (model_type {report.model_type}); MTP names {report.layout}")
    key = f"({report.depth_key})" if report.depth_key else "(config.json has no depth key > 0)"
    declared = f"{report.depths} {key}"
    lines.append(f"MTP depths   {declared}")
    lines.append(f"shards       {len(report.shards)}: {', '.join(report.shards)}")
    for label, rows in report.groups.items():
        title = "shared by all depths" if label == "shared" else f"depth {label}"
        size = sum(r["bytes"] for r in rows)
        lines.append(f"{title}: {len(rows)} tensor(s), {_fmt_bytes(size)}")
        width = max(len(name) for name, _, _ in _collapse_experts(rows))
        for name, desc, count in _collapse_experts(rows):
            lines.append(f"  {name:<{width}}  {desc}" + (f"  x{count}" if count > 1 else ""))
    if report.drafter_shared:
        shared = ", ".join(
            f"{r['name']} [{', '.join(map(str, r['shape']))}] {r['dtype']}" for r in report.drafter_shared
        )
        lines.append(f"drafter also needs  {shared}")
    lines.append(f"MTP total    {report.mtp_tensors} tensor(s), {_fmt_bytes(report.mtp_bytes)}")
    if report.complete:
        lines.append(
            "complete     yes: every declared depth has every tensor its config.json calls for, in its shape"
        )
    else:
        lines.append("complete     NO")
        lines += _problem_lines(report)
    for w in report.warnings:
        lines.append(f"warning      {w}")
    return "\n".join(lines) + "\n"


def _problem_lines(report: InspectReport) -> list[str]:
    lines = [f"  config      {p}" for p in report.config_problems]
    beyond = set(report.beyond_depths)
    for label, kinds in report.problems_by_depth.items():
        if label == "beyond":
            continue
        lines.append(f"  {'shared by all depths' if label == 'shared' else 'depth ' + label}:")
        for name in fold_expert_names(kinds.get("missing", [])):
            lines.append(f"    missing     {name}")
        for entry in fold_expert_names(kinds.get("misshapen", [])):
            lines.append(f"    misshapen   {entry}")
        for name in fold_expert_names(n for n in kinds.get("unexpected", []) if n not in beyond):
            lines.append(f"    unexpected  {name} (not part of a {report.family_title} MTP layer for this config.json)")
    for name in fold_expert_names(report.beyond_depths):
        lines.append(f"  unexpected  {name} (beyond the {report.depths} declared depth(s))")
    return lines


# --- writing operations --------------------------------------------------------------------------


@dataclass
class WriteResult:
    command: str
    out: str
    inputs: dict[str, str]
    family: str
    depths: int
    shards_rewritten: list[str] = field(default_factory=list)
    shards_copied: list[str] = field(default_factory=list)
    shards_linked: list[str] = field(default_factory=list)
    shards_new: list[str] = field(default_factory=list)
    tensors_replaced: list[str] = field(default_factory=list)
    tensors_added: list[str] = field(default_factory=list)
    tensors_written: int = 0
    config_changed: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def render_result(result: WriteResult) -> str:
    lines = [f"wrote        {result.out} ({result.command}, {result.family}, {result.depths} MTP depth(s))"]
    for role, path in result.inputs.items():
        lines.append(f"{role.lower():<12} {path}")
    rows = (
        ("new shards", result.shards_new, f"{', '.join(result.shards_new)} ({result.tensors_written} tensor(s))"),
        ("rewritten", result.shards_rewritten, ", ".join(result.shards_rewritten)),
        ("copied", result.shards_copied, f"{', '.join(result.shards_copied)} (byte for byte)"),
        ("hard-linked", result.shards_linked, ", ".join(result.shards_linked)),
        ("replaced", result.tensors_replaced, f"{len(result.tensors_replaced)} MTP tensor(s)"),
        ("added", result.tensors_added, f"{len(result.tensors_added)} MTP tensor(s)"),
        ("config.json", result.config_changed, "MTP depth count restored"),
    )
    lines += [f"{label:<12} {text}" for label, shown, text in rows if shown]
    lines += [f"note         {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _check_out(out: str, overwrite: bool, *inputs: HFCheckpoint) -> str:
    out = os.path.abspath(os.path.expanduser(str(out)))
    for ckpt in inputs:
        if os.path.realpath(out) == os.path.realpath(ckpt.path):
            raise CkptError(f"OUT {out} is the {ckpt.role} checkpoint itself; expected a new directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise CkptError(f"OUT {out}: parent directory {os.path.dirname(out)} does not exist")
    if os.path.lexists(out):
        if not overwrite:
            raise CkptError(f"OUT {out} already exists; expected a new path (or pass --overwrite)")
        if not os.path.isdir(out):
            raise CkptError(f"OUT {out} exists and is not a directory; refusing to replace it")
    return out


def _same_family(a: HFCheckpoint, b: HFCheckpoint) -> None:
    if a.family.name != b.family.name:
        raise CkptError(
            f"{a.role} is {a.family.title} (model_type {a.config.get('model_type')}) but {b.role} is "
            f"{b.family.title} (model_type {b.config.get('model_type')}); expected the same family"
        )


def _require_complete(ckpt: HFCheckpoint, allow_incomplete: bool, command: str,
                      config: Optional[dict] = None, against: str = "") -> Optional[HeadCheck]:
    """Refuse (CkptError) unless ``ckpt``'s MTP head is complete and well-shaped for ``config``
    (default its own); with ``allow_incomplete`` return the check instead, for a note."""
    check = head_check(ckpt, config)
    if check.ok:
        return None
    if allow_incomplete:
        return check
    whose = f" for {against}" if against else ""
    raise _problem_list_error(
        f"refusing to {command}: {ckpt.label} has no complete, well-shaped {ckpt.family.title} MTP head{whose} "
        f"({len(check.missing)} missing, {len(check.misshapen)} misshapen, {len(check.unexpected)} unexpected "
        f"tensor(s); `verl-mtp ckpt inspect` lists them). Pass {ALLOW_INCOMPLETE_FLAG} to carry the head as it is",
        check.lines(),
    )


def _carried_note(check: Optional[HeadCheck], who: str) -> list[str]:
    if check is None:
        return []
    return [f"{ALLOW_INCOMPLETE_FLAG}: {who}'s MTP head was carried as it is, with problems: "
            + "; ".join(check.lines(limit=12))]


def _problem_list_error(what: str, problems: list[str], limit: int = 40) -> CkptError:
    """The one way the ckpt tools refuse over several problems: ``what``, then one problem a line."""
    shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    return CkptError(what + ":\n  " + "\n  ".join(shown))


def _compare_mtp(a: HFCheckpoint, b: HFCheckpoint) -> list[str]:
    problems = []
    for key in sorted(set(a.mtp) | set(b.mtp), key=_key_order):
        if key not in b.mtp:
            problems.append(f"{a.mtp[key]}: in {a.role} {a.tensors[a.mtp[key]].describe()}, not in {b.role}")
        elif key not in a.mtp:
            problems.append(f"{b.mtp[key]}: in {b.role} {b.tensors[b.mtp[key]].describe()}, not in {a.role}")
        else:
            ea, eb = a.tensors[a.mtp[key]], b.tensors[b.mtp[key]]
            if (ea.shape, ea.dtype) != (eb.shape, eb.dtype):
                problems.append(f"{a.mtp[key]}: {a.role} {ea.describe()} vs {b.role} {eb.describe()}")
    return problems


def _other_files(src: str, skip: set[str], result: WriteResult) -> list[str]:
    """Top-level files of ``src`` that travel with the weights (tokenizer, generation config, ...)."""
    keep = []
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if name in skip or name == OWNER_MARKER:
            continue
        if os.path.isdir(full):
            result.notes.append(f"directory {name}/ of the input was not copied")
        elif name.endswith(".safetensors"):
            result.notes.append(f"{name} is not part of the input's weights (not in its index); not copied")
        elif os.path.isfile(full):
            keep.append(name)
    return keep


def _unique_name(wanted: str, taken: set[str]) -> str:
    if wanted not in taken:
        return wanted
    stem, ext = wanted.rsplit(".", 1)
    n = 1
    while f"{stem}-{n}.{ext}" in taken:
        n += 1
    return f"{stem}-{n}.{ext}"


def _write_modified(
    target: HFCheckpoint,
    staging: str,
    replace: dict[str, TensorEntry],
    add: dict[str, TensorEntry],
    config: Optional[dict],
    link: bool,
    result: WriteResult,
) -> None:
    """Write ``target`` into ``staging`` with the tensors in ``replace`` swapped (same names) and
    those in ``add`` appended as a new shard. Shards without a replaced tensor are copied as files."""
    rename, add_shard = _shard_names(target, bool(add), result)
    written = _write_shards(target, staging, replace, rename, link, result)
    if add:
        write_safetensors(os.path.join(staging, add_shard), sorted(add.items()), NEW_SHARD_METADATA)
        result.shards_new.append(add_shard)
        result.tensors_written += len(add)
        maybe_fail(written + 1)
    if target.index is not None or add:
        write_json(os.path.join(staging, INDEX_NAME), _modified_index(target, replace, add, rename, add_shard))
    if config is None:
        copy_file(os.path.join(target.path, "config.json"), os.path.join(staging, "config.json"))
    else:
        write_json(os.path.join(staging, "config.json"), config)
        result.config_changed = True
    for name in _other_files(target.path, {"config.json", INDEX_NAME, *target.shards}, result):
        copy_file(os.path.join(target.path, name), os.path.join(staging, name))


def _shard_names(target: HFCheckpoint, adding: bool, result: WriteResult) -> tuple[dict[str, str], Optional[str]]:
    """(target shard -> its name in the output, the new shard's name) for a write that adds tensors
    (``adding``) or not."""
    if not adding:
        return {}, None
    if target.index is None:
        # transformers prefers model.safetensors over an index: go sharded so the head is loaded.
        rename = {SINGLE_NAME: "model-00001-of-00002.safetensors"}
        result.notes.append(f"{SINGLE_NAME} became {rename[SINGLE_NAME]} (copied) so that {INDEX_NAME} is used")
        return rename, "model-00002-of-00002.safetensors"
    return {}, _unique_name(GRAFT_SHARD_NAME, set(os.listdir(target.path)) | set(target.shards))


def _write_shards(target: HFCheckpoint, staging: str, replace: dict[str, TensorEntry], rename: dict[str, str],
                  link: bool, result: WriteResult) -> int:
    """Every shard of ``target``, rewritten where it holds a replaced tensor, else copied; returns
    how many files were written."""
    for written, shard in enumerate(target.shards, start=1):
        dst_name = rename.get(shard, shard)
        dst = os.path.join(staging, dst_name)
        held = target.shard_tensors[shard]
        swapped = {n for n, e in held.items() if n in replace and target.tensors.get(n) == e}
        if swapped:
            write_safetensors(dst, [(n, replace[n] if n in swapped else e) for n, e in held.items()],
                              target.shard_metadata[shard])
            result.shards_rewritten.append(dst_name)
            result.tensors_written += len(held)
        else:
            how = copy_file(os.path.join(target.path, shard), dst, link=link)
            (result.shards_linked if how == "linked" else result.shards_copied).append(dst_name)
        maybe_fail(written)
    return len(target.shards)


def _modified_index(target: HFCheckpoint, replace: dict[str, TensorEntry], add: dict[str, TensorEntry],
                    rename: dict[str, str], add_shard: Optional[str]) -> dict:
    """``target``'s index (its other keys kept) with the output's weight map and total size."""
    weight_map = {n: rename.get(target.shard_of(n), target.shard_of(n)) for n in target.tensors}
    weight_map.update({n: add_shard for n in sorted(add)})
    index = dict(target.index) if target.index else {}
    metadata = dict(index.get("metadata") or {})
    # Counted from the output's own tensors: target's total_size may be absent or stale, and no
    # loader checks it (vLLM and transformers read only the weight map).
    written = {**target.tensors, **replace, **add}
    metadata["total_size"] = sum(written[n].nbytes for n in weight_map)
    index["metadata"] = metadata
    index["weight_map"] = weight_map
    return index


def stitch_mtp(verifier: str, donor: str, out: str, *, overwrite: bool = False, link: bool = False,
               allow_incomplete_head: bool = False) -> WriteResult:
    """Write a copy of VERIFIER whose MTP tensors are DONOR's. DONOR may be a full checkpoint of
    the same family or an ``extract`` output; every MTP tensor must match in name (after family
    mapping), shape and dtype. DONOR's head must be complete and well-shaped for its own
    config.json and for VERIFIER's, unless ``allow_incomplete_head``."""
    v = open_checkpoint(verifier, "VERIFIER")
    d = open_checkpoint(donor, "DONOR")
    out = _check_out(out, overwrite, v, d)
    _same_family(v, d)
    if not v.mtp:
        raise CkptError(
            f"{v.label} holds no {v.family.title} MTP tensors ({v.family.layout}), so there is nothing to "
            f"replace; to add a head to a checkpoint that dropped it use `verl-mtp ckpt graft`"
        )
    carried = _require_complete(d, allow_incomplete_head, "stitch")
    if carried is None:
        carried = _require_complete(d, allow_incomplete_head, "stitch", v.config, "VERIFIER's config.json")
    if v.depths != d.depths:
        raise CkptError(
            f"VERIFIER declares {v.depths} MTP depth(s) ({v.depth_key() or 'no depth key'}) but DONOR declares "
            f"{d.depths}; expected equal (to restore a dropped depth key use `verl-mtp ckpt graft`)"
        )
    problems = _compare_mtp(v, d)
    if problems:
        raise _problem_list_error("refusing to stitch: the MTP tensors of VERIFIER and DONOR differ", problems)
    replace = {v.mtp[key]: d.tensors[d.mtp[key]] for key in v.mtp}
    result = WriteResult("stitch", out, {"VERIFIER": v.path, "DONOR": d.path}, v.family.name, v.depths,
                         tensors_replaced=sorted(replace, key=_natural))
    result.notes += _carried_note(carried, "DONOR")
    with staged_output(out, overwrite) as staging:
        _write_modified(v, staging, replace, {}, None, link, result)
    return result


def _graft_problems(base: HFCheckpoint, rl: HFCheckpoint) -> list[str]:
    """Does BASE's head pair with RL (trunk sizes, RL's own MTP tensors, names)? The head's own
    shapes against RL's config are the whole-head check's (``_require_complete``)."""
    problems = []
    shared_b = {s: [n for n in base.drafter_shared() if n.endswith(s)] for s in base.family.drafter_suffixes}
    shared_r = {s: [n for n in rl.drafter_shared() if n.endswith(s)] for s in rl.family.drafter_suffixes}
    for suffix in base.family.drafter_suffixes:
        if shared_b[suffix] and shared_r[suffix]:
            nb, nr = min(shared_b[suffix], key=len), min(shared_r[suffix], key=len)
            eb, er = base.tensors[nb], rl.tensors[nr]
            if eb.shape != er.shape:
                problems.append(
                    f"hidden size / vocabulary differ: BASE {nb} {list(eb.shape)} vs RL {nr} {list(er.shape)}"
                )
    hb, hr = base.hidden_size(), rl.hidden_size()
    if hb is not None and hr is not None and hb != hr:
        problems.append(f"config.json hidden_size differs: BASE {hb} vs RL {hr}")
    for key in sorted(rl.mtp, key=_key_order):
        name = rl.mtp[key]
        if key not in base.mtp:
            problems.append(f"RL {name} {rl.tensors[name].describe()} has no counterpart in BASE's head")
            continue
        eb, er = base.tensors[base.mtp[key]], rl.tensors[name]
        if (eb.shape, eb.dtype) != (er.shape, er.dtype):
            problems.append(f"{name}: RL {er.describe()} vs BASE {base.mtp[key]} {eb.describe()}")
    return problems


def graft_mtp(base: str, rl: str, out: str, *, overwrite: bool = False, link: bool = False,
              allow_incomplete_head: bool = False) -> WriteResult:
    """Write a copy of RL carrying BASE's MTP head: RL's MTP tensors (if any) are replaced by
    BASE's; the ones RL dropped are added as a new shard; a dropped depth key is restored.
    BASE's head must be complete and well-shaped for BASE's config.json and for RL's (the
    output's), unless ``allow_incomplete_head``."""
    b = open_checkpoint(base, "BASE")
    r = open_checkpoint(rl, "RL")
    out = _check_out(out, overwrite, b, r)
    _same_family(b, r)
    carried = _require_complete(b, allow_incomplete_head, "graft")
    # The output is RL's config (depth key restored) with BASE's head: the head must fit it.
    out_config = with_depths(r.config, b.depths, like=b.config, family=r.family)
    fit = head_check(b, out_config)
    problems = []
    if not fit.ok and allow_incomplete_head:
        carried = carried or fit
    elif not fit.ok:
        problems += [f"for RL's config.json: {line}" for line in fit.lines()]
    problems += _graft_problems(b, r)
    # Names the added tensors get in RL: RL's own MTP naming; Qwen's mtp. prefix from BASE when RL has none.
    target_naming = r.naming if r.mtp else r.family.naming(r.config, b.depths, b.mtp.values())
    add: dict[str, TensorEntry] = {}
    for key in sorted(b.mtp, key=_key_order):
        if key in r.mtp:
            continue
        name = target_naming.name(key)
        if name in r.tensors:
            problems.append(f"BASE's {b.mtp[key]} would be written as {name}, which RL already holds as a trunk tensor")
        add[name] = b.tensors[b.mtp[key]]
    if problems:
        raise _problem_list_error("refusing to graft: BASE's MTP head does not fit RL", problems)
    replace = {r.mtp[key]: b.tensors[b.mtp[key]] for key in r.mtp}
    config = None if r.depths == b.depths else out_config
    result = WriteResult("graft", out, {"BASE": b.path, "RL": r.path}, r.family.name, b.depths,
                         tensors_replaced=sorted(replace, key=_natural), tensors_added=sorted(add, key=_natural))
    result.notes += _carried_note(carried, "BASE")
    eb, er = b.embedding(), r.embedding()
    if add and eb is not None and er is not None and eb.dtype != er.dtype:
        result.notes.append(f"the added head keeps BASE's dtype {eb.dtype}; RL's trunk is {er.dtype}")
    with staged_output(out, overwrite) as staging:
        _write_modified(r, staging, replace, add, config, link, result)
    return result


def extract_mtp(
    src: str, out: str, *, overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_incomplete_head: bool = False,
) -> WriteResult:
    """Write SRC's MTP tensors plus the trunk tensors a drafter shares (embedding, lm_head) as a
    checkpoint of their own: shards, index, config.json copy and ``mtp_extract.json``."""
    s = open_checkpoint(src, "SOURCE")
    out = _check_out(out, overwrite, s)
    carried = _require_complete(s, allow_incomplete_head, "extract")
    names = [s.mtp[key] for key in sorted(s.mtp, key=_key_order)] + s.drafter_shared()
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = s.tensors[name].nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    result = WriteResult("extract", out, {"SOURCE": s.path}, s.family.name, s.depths)
    result.notes += _carried_note(carried, "SOURCE")
    with staged_output(out, overwrite) as staging:
        weight_map = {}
        for i, group in enumerate(groups, start=1):
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(os.path.join(staging, shard), [(n, s.tensors[n]) for n in group], NEW_SHARD_METADATA)
            weight_map.update({n: shard for n in group})
            result.shards_new.append(shard)
            result.tensors_written += len(group)
            maybe_fail(i)
        total = sum(s.tensors[n].nbytes for n in names)
        write_json(os.path.join(staging, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
        copy_file(os.path.join(s.path, "config.json"), os.path.join(staging, "config.json"))
        from verl_mtp.version import __version__

        write_json(os.path.join(staging, EXTRACT_INFO_NAME), {
            "family": s.family.name,
            "model_type": s.config.get("model_type"),
            "depths": s.depths,
            "depth_key": s.depth_key(),
            "source": s.path,
            "mtp_tensors": len(s.mtp),
            "mtp_bytes": sum(s.tensors[n].nbytes for n in s.mtp.values()),
            "drafter_shared": s.drafter_shared(),
            "tool": f"verl-mtp {__version__}",
        })
    if not s.drafter_shared():
        result.notes.append("SOURCE has no embedding / lm_head outside the MTP head; only MTP tensors were written")
    return result
