"""accept-eval's error class and the checks of its options (before anything loads)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from verl_mtp.errors import VerlMtpError

DEFAULT_ANCHOR_CHUNK = 256  # anchors whose vocabulary-sized logits are alive at once


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


def temperature_key(t: float) -> str:
    """How a temperature names its entry in the report's ``sampled`` / ``argmax_draft`` dicts."""
    return f"{t:g}"
