"""The speculative-decoding arguments the rollout engine receives for MTP.

Mirrors what verl 0.9.1's vLLM and SGLang servers pass (``build_mtp_speculative_config`` in
``verl/workers/rollout/vllm_rollout/utils.py`` imports vllm, so it cannot be called where vllm is
absent). ``verl-mtp explain`` prints these so users see the engine arguments before a run.
"""

from __future__ import annotations

from typing import Any, Mapping

SPECULATIVE_ENGINES = ("vllm", "sglang")


def speculative_engine_args(mtp: Any, engine: str, engine_kwargs: Mapping | None = None) -> dict[str, Any]:
    """Engine arguments for MTP speculative rollout; ``{}`` when it is off."""
    from verl_mtp.config import MtpConfigError

    if not (mtp.enable and mtp.enable_rollout):
        return {}
    if engine == "vllm":
        user = dict((engine_kwargs or {}).get("speculative_config") or {})
        # verl lets rollout.engine_kwargs.vllm.speculative_config override and extend the MTP values.
        return {
            "speculative_config": {
                "method": mtp.method,
                "num_speculative_tokens": mtp.num_speculative_tokens,
                **{k: v for k, v in user.items() if v is not None},
            }
        }
    if engine == "sglang":
        return {
            "speculative_algorithm": mtp.speculative_algorithm,
            "speculative_num_steps": mtp.speculative_num_steps,
            "speculative_eagle_topk": mtp.speculative_eagle_topk,
            "speculative_num_draft_tokens": mtp.speculative_num_draft_tokens,
            # Keep the drafter's weights across sleep/wake so it does not go stale.
            "enable_weights_cpu_backup": True,
            "enable_draft_weights_cpu_backup": True,
        }
    raise MtpConfigError(
        f"actor_rollout_ref.model.mtp.enable_rollout=True needs a rollout engine with MTP speculative decoding, "
        f"but actor_rollout_ref.rollout.name={engine!r}; valid choices are {', '.join(SPECULATIVE_ENGINES)}"
    )
