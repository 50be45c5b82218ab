"""``verl-mtp ckpt``: inspect, extract, stitch and graft MTP heads of Hugging Face safetensors
checkpoints, streaming (headers and one tensor's bytes at a time; unchanged shards are copied as files).

Importing this package or reading a checkpoint touches neither verl nor torch (plain json and
safetensors headers). The whole-head check (every tensor and shape the checkpoint's config.json calls
for) is ``verl_mtp.models.head_spec``, shared with the export check.
"""

from verl_mtp.ckpt.checkpoint import CkptError, HFCheckpoint, completeness, head_check, open_checkpoint
from verl_mtp.ckpt.files import FAIL_AFTER_SHARDS_ENV, TensorEntry
from verl_mtp.ckpt.tools import (
    InspectReport,
    WriteResult,
    extract_mtp,
    graft_mtp,
    inspect_checkpoint,
    parse_size,
    render_inspect,
    render_result,
    stitch_mtp,
)

__all__ = [
    "FAIL_AFTER_SHARDS_ENV",
    "CkptError",
    "HFCheckpoint",
    "InspectReport",
    "TensorEntry",
    "WriteResult",
    "completeness",
    "extract_mtp",
    "graft_mtp",
    "head_check",
    "inspect_checkpoint",
    "open_checkpoint",
    "parse_size",
    "render_inspect",
    "render_result",
    "stitch_mtp",
]
