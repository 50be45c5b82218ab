"""accept-eval's error class and the checks of its options (before anything loads)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from verl_mtp.errors import VerlMtpError

DEFAULT_ANCHOR_CHUNK = 256  # anchors whose vocabulary-sized logits are alive at once
# Starts of the context-length buckets (tokens before the drafted one); the last is open-ended.
DEFAULT_CONTEXT_BUCKETS = (0, *(2**e for e in range(8, 18)))  # 0, 256, 512, 1k, ..., 128k


class AcceptEvalError(VerlMtpError, ValueError):
    """Bad input to the evaluator (the CLI prints it and exits 2)."""


def check_options(k_max: Any, temperatures: Sequence[Any]) -> None:
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise AcceptEvalError(f"--num-speculative-tokens must be an integer >= 1, got {k_max!r}")
    if not temperatures:
        raise AcceptEvalError("at least one --temperature is needed")
    for t in temperatures:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise AcceptEvalError(
                f"--temperature must be a finite number > 0, got {t!r} (greedy acceptance is always reported)"
            )


def parse_context_buckets(text: str) -> tuple[int, ...]:
    """``--context-buckets`` "0,1024,4k,..." -> bucket starts (a ``k`` suffix is x1024)."""
    edges = []
    for part in str(text).split(","):
        item = part.strip().lower()
        scale = 1024 if item.endswith("k") else 1
        digits = item[:-1] if scale > 1 else item
        if not (digits.isascii() and digits.isdigit()):
            raise AcceptEvalError(
                f"--context-buckets {text!r}: {part.strip()!r} is not a token count; expected comma-separated "
                "integers >= 0 (a 'k' suffix means x1024), increasing from 0, e.g. 0,1024,4k,32k"
            )
        edges.append(int(digits) * scale)
    check_context_buckets(edges, shown=text)
    return tuple(edges)


def check_context_buckets(edges: Any, shown: Any = None) -> None:
    """Bucket starts must be integers, start at 0 (every token has a bucket) and increase."""
    shown = edges if shown is None else shown
    expect = "expected increasing token counts starting at 0, e.g. 0,1024,4096,32768"
    if isinstance(edges, (str, bytes)) or not isinstance(edges, Sequence) or not edges:
        raise AcceptEvalError(f"--context-buckets {shown!r}: {expect}")
    for e in edges:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise AcceptEvalError(f"--context-buckets {shown!r}: {e!r} is not an integer >= 0; {expect}")
    if edges[0] != 0:
        raise AcceptEvalError(
            f"--context-buckets {shown!r}: the first bucket starts at {edges[0]}, not 0, so the tokens "
            f"before it would not be counted; {expect}"
        )
    for lo, hi in zip(edges, edges[1:]):
        if hi <= lo:
            raise AcceptEvalError(f"--context-buckets {shown!r}: {hi} follows {lo} (not increasing); {expect}")


def temperature_key(t: float) -> str:
    """How a temperature names its entry in the report's ``sampled`` / ``argmax_draft`` dicts."""
    return f"{t:g}"
