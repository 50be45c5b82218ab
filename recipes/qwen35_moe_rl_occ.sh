#!/usr/bin/env bash
# Qwen3.5 MoE (35B-A3B; hybrid linear/full attention, one MTP layer declared as text_config.
# mtp_num_hidden_layers), DAPO, MTP trained jointly with the RL policy loss and OCC
# (arXiv 2605.28184's setting).
#
#   DRY_RUN=1 MODEL_PATH=/models/Qwen3.5-35B-A3B bash recipes/qwen35_moe_rl_occ.sh
#
# Check the Hugging Face id below and the checkpoint's config.json (expert and KV-head counts
# against EP and TP; the dry run checks them when MODEL_PATH is a local directory) before use, and
# that your verl/mbridge build supports the architecture on Megatron. Sized for 2 nodes of
# 8 x 80 GB GPUs. Only dry-run so far (config composition and checks), never launched on GPUs.
set -euo pipefail

: "${MODEL_PATH:=Qwen/Qwen3.5-35B-A3B}"   # check: the id of the MoE Qwen3.5 checkpoint you train
: "${NNODES:=2}"
# TP=2 (few KV heads) for the attention and the long-sequence activations; no PP at this size.
# The routed experts over EP=16 fill the 16 GPUs (~2B expert parameters a GPU). CP stays 1
# (linear-attention layers).
: "${ACTOR_TP:=2}" "${ACTOR_PP:=1}" "${ACTOR_CP:=1}" "${ACTOR_EP:=16}" "${ACTOR_ETP:=1}"
# ~70 GB of bf16 weights: TP=4 replicas, four of them.
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
