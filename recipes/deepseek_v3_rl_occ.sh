#!/usr/bin/env bash
# DeepSeek-V3 (671B MoE, 37B active, MLA, one MTP layer), DAPO, MTP trained jointly with the RL
# policy loss and OCC (arXiv 2605.28184's setting).
#
#   DRY_RUN=1 MODEL_PATH=/models/DeepSeek-V3-bf16 bash recipes/deepseek_v3_rl_occ.sh
#
# The released weights are FP8; training needs a BF16 copy (DeepSeek's fp8_cast_bf16.py), and
# MODEL_PATH should point at it. Sized for 32 nodes of 8 x 80 GB GPUs. Only dry-run so far (config
# composition and checks), never launched on GPUs.
set -euo pipefail

: "${MODEL_PATH:=deepseek-ai/DeepSeek-V3}"
: "${NNODES:=32}"
# DeepSeek's own layout: no TP (MLA keeps attention small), deep PP, wide EP. 61 layers do not
# split evenly over PP=16: 3 on the first stage (the dense layers next to the embedding), 2 on the
# last (it also runs the MTP layer and the output layer), 4 on each of the 14 in between.
# 256 experts over EP=16 (16 a GPU): ~2.5B expert parameters a GPU.
: "${ACTOR_TP:=1}" "${ACTOR_PP:=16}" "${ACTOR_CP:=1}" "${ACTOR_EP:=16}" "${ACTOR_ETP:=1}"
: "${PP_FIRST_LAYERS:=3}" "${PP_LAST_LAYERS:=2}"
# ~1.3 TB of bf16 weights: a rollout replica spans 4 nodes, attention TP=8 x DP=4 with the experts
# spread over all 32 GPUs (verl requires EP = TP x DP); the actor is offloaded while it generates.
: "${ROLLOUT_TP:=8}" "${ROLLOUT_DP:=4}" "${ROLLOUT_EP:=32}" "${ROLLOUT_GPU_MEM:=0.8}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The two uneven-stage sizes are Megatron TransformerConfig fields that verl's YAML does not
# declare, hence '++' (add or override): the dry run checks the split against config.json's layer
# count, but not the spelling of these two keys.
run_verl "${COMMON_ARGS[@]}" \
    "++actor_rollout_ref.actor.megatron.override_transformer_config.num_layers_in_first_pipeline_stage=$PP_FIRST_LAYERS" \
    "++actor_rollout_ref.actor.megatron.override_transformer_config.num_layers_in_last_pipeline_stage=$PP_LAST_LAYERS" \
    "${RL_OCC_ARGS[@]}" \
    "$@"
