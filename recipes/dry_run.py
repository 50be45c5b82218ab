"""A recipe's dry run (DRY_RUN=1): check the recipe's full verl config without launching anything.

common.sh calls ``$PYTHON recipes/dry_run.py [--json] OVERRIDE...`` with the same overrides it would
give ``python -m verl.trainer.main_ppo --config-path=pkg://verl_mtp.conf --config-name=ppo_megatron_mtp``.
Running it under the same interpreter as the real launch means the dry run checks the environment
that will train. In order:

1. ``verl-mtp explain`` (called in-process: the console script's own code, messages and exit codes):
   Hydra composes verl's config with the overrides, so a misspelled key fails here, then verl-mtp
   validates the MTP settings and prints the MTP plan (stdout; JSON with ``--json``).
2. What verl's driver checks before it starts Ray: ``verl.utils.config.validate_config`` (batch
   sizes, the actor config as a dataclass), plus the rollout and algorithm configs as the workers
   and the trainer build them (e.g. rollout expert_parallel_size = tensor x data parallel).
3. The Megatron and rollout grids divide the cluster, and (when the model path is a local directory
   with config.json) the layers, attention heads and experts divide over PP, TP and EP: what Megatron
   and verl assert at start-up on the GPUs.

Exit status 0 when everything passes, 2 otherwise (the message goes to stderr). Run it as a file,
never as ``import recipes...``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Optional


def _model_value(hf_config: Optional[dict], *keys: str) -> Optional[int]:
    """The first of ``keys`` set in a config.json dict, at top level or under text_config."""
    if not hf_config:
        return None
    for cfg in (hf_config, hf_config.get("text_config") or {}):
        for key in keys:
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


def check_parallel_layout(config) -> list[str]:
    """The Megatron and rollout grids against the cluster and, when config.json is local, the model.

    These are what Megatron (parallel-state set-up, TransformerConfig) and verl (rollout replicas)
    assert at start-up on the GPUs. Returns a summary line per grid.
    """
    from verl_mtp.config import read_local_hf_config

    world = int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)
    mcore = config.actor_rollout_ref.actor.megatron
    tp, pp, cp = (
        int(mcore[k]) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
    )
    ep = int(mcore.expert_model_parallel_size)
    etp = int(mcore.expert_tensor_parallel_size or tp)  # Megatron: unset expert TP follows TP
    if world % (tp * pp * cp):
        raise ValueError(
            f"{world} GPUs (trainer.nnodes x trainer.n_gpus_per_node) cannot be split into Megatron "
            f"TP={tp} x PP={pp} x CP={cp} groups; choose sizes whose product divides {world}"
        )
    if world % (etp * ep * pp):
        raise ValueError(
            f"{world} GPUs cannot be split into Megatron expert groups of expert TP={etp} x EP={ep} x PP={pp}; "
            f"choose expert sizes whose product divides {world}"
        )
    rollout = config.actor_rollout_ref.rollout
    rtp, rdp, rpp = (
        int(rollout[k]) for k in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size")
    )
    replica = rtp * rdp * rpp
    if world % replica:
        raise ValueError(
            f"{world} GPUs cannot hold whole rollout replicas of TP={rtp} x DP={rdp} = {replica} GPUs; "
            f"choose a replica size that divides {world}"
        )

    model_path = config.actor_rollout_ref.model.get("hf_config_path") or config.actor_rollout_ref.model.path
    hf = read_local_hf_config(model_path) if model_path else None
    model_line = f"model: {model_path} has no local config.json, so layers, heads and experts were not checked"
    if hf is not None:
        layers = _model_value(hf, "num_hidden_layers")
        overrides = mcore.get("override_transformer_config") or {}
        first = overrides.get("num_layers_in_first_pipeline_stage")
        last = overrides.get("num_layers_in_last_pipeline_stage")
        # (other ways to lay out the stages: virtual pipeline stages, an explicit layout, counting
        # the embedding or loss as a layer; not checked here)
        custom = mcore.get("virtual_pipeline_model_parallel_size") or any(
            overrides.get(k) for k in ("pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                                       "account_for_loss_in_pipeline_split")
        )
        if layers and pp > 1 and not custom:
            middle_stages = pp - (first is not None) - (last is not None)
            middle_layers = layers - (first or 0) - (last or 0)
            if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (
                middle_stages and (middle_layers <= 0 or middle_layers % middle_stages)
            ):
                split = f" with {first} layer(s) on the first and {last} on the last stage" if first or last else ""
                raise ValueError(
                    f"{layers} layers cannot be split evenly over PP={pp} pipeline stages{split}; choose a PP "
                    f"that divides the layer count, or set override_transformer_config."
                    f"num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage"
                )
        heads = _model_value(hf, "num_attention_heads")
        if heads and heads % tp:
            raise ValueError(
                f"the model's {heads} attention heads cannot be split over Megatron TP={tp}; "
                f"choose a TP that divides {heads}"
            )
        groups = _model_value(hf, "num_key_value_heads")
        if groups and groups % tp and tp % groups:  # Megatron replicates KV heads when TP is a multiple
            raise ValueError(
                f"the model's {groups} KV heads (query groups) must be a multiple or a divisor of Megatron TP={tp}"
            )
        experts = _model_value(hf, "n_routed_experts", "num_experts")
        if experts and experts % ep:
            raise ValueError(
                f"the model's {experts} routed experts cannot be split over EP={ep}; "
                f"choose an EP that divides {experts}"
            )
        model_line = "model: " + (f"{layers} layers over PP={pp}" if layers else "no num_hidden_layers in config.json")
        model_line += f", {experts} experts over EP={ep}" if experts else ""

    return [
        f"GPUs {world}; Megatron TP={tp} PP={pp} CP={cp} -> DP={world // (tp * pp * cp)}"
        + (f"; experts EP={ep} expert-TP={etp} -> expert-DP={world // (etp * ep * pp)}" if ep > 1 else ""),
        model_line,
        f"rollout {rollout.name}: {world // replica} replica(s) of {replica} GPU(s) "
        f"(TP={rtp} DP={rdp} EP={rollout.expert_parallel_size})",
    ]


def verl_checks(overrides: list[str]) -> list[str]:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from verl_mtp.tools.explain import compose_run_config

    config = compose_run_config(overrides)
    # verl prints its progress to stdout; keep stdout for the plan (it may be JSON).
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Disabled critic as algorithm.adv_estimator != gae"
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
        omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
        omega_conf_to_dataclass(config.algorithm)
    return check_parallel_layout(config)


def main(argv: list[str]) -> int:
    try:
        from verl_mtp.cli import main as verl_mtp_main
    except ImportError as exc:
        print(
            f"dry run: {sys.executable} cannot import verl-mtp ({exc}); set PYTHON to the interpreter of the "
            f"environment where verl and verl-mtp are installed",
            file=sys.stderr,
        )
        return 2

    as_json = "--json" in argv
    overrides = [a for a in argv if a != "--json"]
    rc = verl_mtp_main(["explain", *overrides, *(["--json"] if as_json else [])])
    if rc != 0:
        return rc
    try:
        summary = verl_checks(overrides)
    except Exception as exc:  # verl raises AssertionError, ValueError or Hydra's InstantiationException
        print(f"dry run: the config would fail at start-up: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for line in summary:
        print(f"dry run: {line}", file=sys.stderr)
    print("dry run: all checks passed; nothing was launched", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
