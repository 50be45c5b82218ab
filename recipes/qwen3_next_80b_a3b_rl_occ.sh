#!/usr/bin/env bash
# Qwen3-Next-80B-A3B (hybrid Gated DeltaNet / gated attention, 512 experts, one MTP layer), DAPO,
# MTP trained jointly with the RL policy loss and OCC (arXiv 2605.28184's setting).
# For reasoning RL the -Thinking checkpoint is the usual start; both declare the same MTP layer.
#
#   DRY_RUN=1 MODEL_PATH=/models/Qwen3-Next-80B-A3B-Instruct bash recipes/qwen3_next_80b_a3b_rl_occ.sh
#
# Sized for 4 nodes of 8 x 80 GB GPUs. Only dry-run so far (config composition and checks), never
# launched on GPUs; Megatron support for this architecture comes from megatron-core/mbridge.
set -euo pipefail

: "${MODEL_PATH:=Qwen/Qwen3-Next-80B-A3B-Instruct}"
: "${NNODES:=4}"
# Only 2 KV heads, so TP <= 2. 48 layers over PP=2 (24 a stage). CP stays 1: context parallelism
# through the linear-attention (Gated DeltaNet) layers is not something to assume.
# 512 experts over EP=16 (32 a GPU) fills a stage's 16 GPUs; ~2.5B expert parameters a GPU.
: "${ACTOR_TP:=2}" "${ACTOR_PP:=2}" "${ACTOR_CP:=1}" "${ACTOR_EP:=16}" "${ACTOR_ETP:=1}"
# ~160 GB of bf16 weights: TP=4 replicas (40 GB a GPU), eight of them.
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
