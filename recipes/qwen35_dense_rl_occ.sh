#!/usr/bin/env bash
# Qwen3.5 dense (27B; hybrid linear/full attention, one MTP layer declared as text_config.
# mtp_num_hidden_layers), DAPO, MTP trained jointly with the RL policy loss and OCC
# (arXiv 2605.28184's setting).
#
#   DRY_RUN=1 MODEL_PATH=/models/Qwen3.5-27B bash recipes/qwen35_dense_rl_occ.sh
#
# Check the Hugging Face id below and the checkpoint's config.json (layer and KV-head counts
# against PP and TP; the dry run checks them when MODEL_PATH is a local directory) before use, and
# that your verl/mbridge build supports the architecture on Megatron. Sized for 2 nodes of
# 8 x 80 GB GPUs. Only dry-run so far (config composition and checks), never launched on GPUs.
set -euo pipefail

: "${MODEL_PATH:=Qwen/Qwen3.5-27B}"   # check: the id of the dense Qwen3.5 checkpoint you train
: "${NNODES:=2}"
# 27B over TP=4 x PP=2 (3.4B parameters a GPU) with DP=2 sharding the optimizer. TP=4 keeps the
# tensor-parallel group inside a node; PP=2 needs an even layer count. CP stays 1 (linear-attention
# layers).
: "${ACTOR_TP:=4}" "${ACTOR_PP:=2}" "${ACTOR_CP:=1}"
# ~55 GB of bf16 weights: TP=4 replicas, four of them.
: "${ROLLOUT_TP:=4}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# SGLang >= 0.5.10 does not start speculative decoding on this hybrid (Gated DeltaNet) model while its
# radix cache runs in the default no_buffer mamba mode, and verl does not turn the cache off.
if [[ "$ROLLOUT" == sglang && "$SPEC" == 1 ]]; then
    COMMON_ARGS+=(+actor_rollout_ref.rollout.engine_kwargs.sglang.disable_radix_cache=True)
fi

run_verl "${COMMON_ARGS[@]}" \
    "${RL_OCC_ARGS[@]}" \
    "$@"
