"""Streaming safetensors I/O and all-or-nothing output directories.

Tensors are moved as byte ranges: a tensor is read from its source file at the offsets the
source header gives and written unchanged, so every dtype (FP8 with scale tensors included) is
copied bit-exact and memory stays at one copy buffer, whatever the shard or tensor size. The
safetensors format: 8-byte little-endian header length N, N bytes of JSON header
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``,
offsets relative to the data area, contiguous), then the data area.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from verl_mtp.errors import VerlMtpError

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
COPY_BUFFER_BYTES = 16 * 1024 * 1024

# Test-only fault injection: "N" raises after N output shard files, "N:kill" SIGKILLs the process.
FAIL_AFTER_SHARDS_ENV = "VERL_MTP_CKPT_FAIL_AFTER_SHARDS"
# The marker a staging directory carries while a run owns it: "<pid> <hostname>".
OWNER_MARKER = ".verl-mtp-ckpt-owner"
# A staging directory without a marker older than this is stale (killed before writing it).
UNMARKED_STALE_SECONDS = 600


class SafetensorsFormatError(VerlMtpError, ValueError):
    """A file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str  # file holding it
    start: int  # absolute byte offset of its data in that file
    nbytes: int

    @property
    def itemsize(self) -> int:
        if self.dtype in DTYPE_SIZES:
            return DTYPE_SIZES[self.dtype]
        numel = 1
        for d in self.shape:
            numel *= d
        return max(1, self.nbytes // numel) if numel else 1

    def describe(self) -> str:
        return f"[{', '.join(map(str, self.shape))}] {self.dtype}"


@dataclass
class SafetensorsFile:
    path: str
    metadata: Optional[dict]
    tensors: dict[str, TensorEntry]  # in data-offset order


def read_safetensors_header(path: str) -> SafetensorsFile:
    """Parse a safetensors file's header (reads only the header bytes)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsFormatError(f"{path}: too short for a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsFormatError(f"{path}: header length {header_len} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsFormatError(f"{path}: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_size = size - data_start
    entries = []
    for name, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsFormatError(f"{path}: bad header entry for {name!r}: {info!r}") from exc
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} data_offsets [{begin}, {end}] lie outside the {data_size}-byte data area"
            )
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPE_SIZES and numel * DTYPE_SIZES[dtype] != end - begin:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} is {dtype} {list(shape)} but holds {end - begin} bytes"
            )
        entries.append(TensorEntry(name, dtype, shape, path, data_start + begin, end - begin))
    entries.sort(key=lambda e: e.start)
    return SafetensorsFile(path=path, metadata=metadata, tensors={e.name: e for e in entries})


def _copy_range(src, dst, nbytes: int, what: str) -> None:
    left = nbytes
    while left:
        chunk = src.read(min(COPY_BUFFER_BYTES, left))
        if not chunk:
            raise OSError(f"{what}: source ended {left} bytes early")
        dst.write(chunk)
        left -= len(chunk)


def write_safetensors(path: str, tensors: Iterable[tuple[str, TensorEntry]], metadata: Optional[dict]) -> int:
    """Write a safetensors file holding ``(name, source entry)`` pairs, copying each tensor's
    bytes from its source file. Tensors are laid out by element size (largest first), then name,
    so every tensor is aligned to its element size. Returns the file size."""
    items = sorted(tensors, key=lambda t: (-t[1].itemsize, t[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, entry in items:
        header[name] = {
            "dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    handles: dict[str, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for name, entry in items:
                src = handles.get(entry.path)
                if src is None:
                    src = handles[entry.path] = open(entry.path, "rb")
                src.seek(entry.start)
                _copy_range(src, out, entry.nbytes, f"{entry.path}:{entry.name}")
    finally:
        for h in handles.values():
            h.close()
    return 8 + len(blob) + offset


def copy_file(src: str, dst: str, link: bool = False) -> str:
    """Copy ``src`` to ``dst`` byte for byte; with ``link``, hard-link instead where the
    filesystem allows (falls back to a copy). Returns "linked" or "copied"."""
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def maybe_fail(shards_written: int) -> None:
    """Test hook (see FAIL_AFTER_SHARDS_ENV): fail once ``shards_written`` output shards exist."""
    spec = os.environ.get(FAIL_AFTER_SHARDS_ENV)
    if not spec:
        return
    count, _, mode = spec.partition(":")
    if shards_written < int(count):
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{FAIL_AFTER_SHARDS_ENV}={spec}: simulated failure after {shards_written} shard(s)")


def _owner_alive(staging: str) -> bool:
    try:
        with open(os.path.join(staging, OWNER_MARKER)) as f:
            pid_text, _, host = f.read().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        # No marker: killed between creating the directory and marking it, or not ours.
        try:
            return time.time() - os.path.getmtime(staging) < UNMARKED_STALE_SECONDS
        except OSError:
            return True
    if host != socket.gethostname():
        return True  # cannot tell; leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dirs(out: str) -> list[str]:
    parent, base = os.path.split(os.path.abspath(out))
    pattern = re.compile(re.escape(base) + r"\.tmp-.+")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = [os.path.join(parent, n) for n in sorted(names) if pattern.fullmatch(n)]
    return [p for p in found if os.path.isdir(p)]


def remove_stale_staging(out: str) -> list[str]:
    """Remove ``OUT.tmp-*`` directories left by runs that were killed (owner process gone)."""
    removed = []
    for staging in staging_dirs(out):
        if not _owner_alive(staging):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


@contextmanager
def staged_output(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh sibling directory ``OUT.tmp-XXXX`` to write into; on success rename it to
    OUT, on any exception remove it. OUT never exists half-written.

    A run killed outright (SIGKILL, power loss) can leave its ``OUT.tmp-XXXX`` behind; the next
    run for the same OUT removes it once its owner process is gone.
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output parent directory {parent} does not exist")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists (pass --overwrite to replace it)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileExistsError(f"output {out} exists and is not a directory; refusing to replace it")
    remove_stale_staging(out)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(staging, OWNER_MARKER), "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        yield staging
        os.remove(os.path.join(staging, OWNER_MARKER))
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
