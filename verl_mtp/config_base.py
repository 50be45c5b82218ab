"""The part of verl-mtp's config that needs no verl: the key prefix, the choice tuples the rollout
planners read, the dotted-key reader ``select`` and ``read_local_hf_config``.

``verl_mtp.config`` re-exports all of it (its class extends verl's ``MtpConfig`` and so imports
verl). The speculative-argument planner (``verl_mtp.rollout.spec_args``) imports only this module,
so it also runs where verl cannot be installed: the vLLM engine environment, whose transformers
verl 0.9.1 does not accept.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

try:  # omegaconf comes with verl; the engine environment has none, and no OmegaConf nodes either
    from omegaconf.errors import MissingMandatoryValue
except ImportError:  # pragma: no cover - exercised in the engine environment
    class MissingMandatoryValue(Exception):  # type: ignore[no-redef]
        """Stands in for omegaconf's: never raised without omegaconf."""

MTP_KEY_PREFIX = "actor_rollout_ref.model.mtp"
# rollout.name values with MTP speculation.
SPECULATIVE_ENGINES = ("vllm", "sglang")
# How the engine's drafter picks its draft tokens (vLLM's SpeculativeConfig.draft_sample_method):
# greedy = argmax of the draft distribution q, accepted with probability p(draft) (p: the target's
# distribution); probabilistic = sampled from q, accepted with min(1, p/q): sum_x min(p, q) per
# position. None (the default) leaves the engine's own default (greedy).
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")


def select(cfg: Any, dotted: str, default: Any = None) -> Any:
    """``cfg.<dotted>`` in a run config (OmegaConf node, dict, dataclass or plain object), or
    ``default`` when a key on the way is missing, unset (``???``) or None.

    Only a missing key falls back; any other error (an interpolation that does not resolve, a
    list where a mapping was expected) propagates, so a broken config is not read as a default.
    """
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part)
        except (AttributeError, KeyError, MissingMandatoryValue):
            return default
    return default if node is None else node


def read_local_hf_config(model_path: str) -> Optional[dict]:
    """``config.json`` of a local checkpoint as a dict, or None when the path is not local."""
    path = os.path.expanduser(str(model_path))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        return json.load(f)
