#!/usr/bin/env bash
# GLM-4.5-Air (106B MoE, 12B active, one MTP layer), DAPO, MTP trained jointly with the RL policy
# loss and OCC (arXiv 2605.28184's setting; see mimo_7b_rl_dapo_rl_occ.sh for what it does).
#
#   DRY_RUN=1 MODEL_PATH=/models/GLM-4.5-Air bash recipes/glm45_air_dapo_rl_occ.sh
#
# Sized for 4 nodes of 8 x 80 GB GPUs. Only dry-run so far (config composition and checks), never
# launched on GPUs.
set -euo pipefail

: "${MODEL_PATH:=zai-org/GLM-4.5-Air}"
: "${NNODES:=4}"
# 46 layers: PP must divide 46, so PP=2 (23 layers a stage; the MTP layer joins the last one).
# TP=2 divides the 8 KV heads and splits the dense part and the long-sequence activations.
# 128 routed experts over EP=16 (8 a GPU) fills the 16 GPUs of a stage, so expert TP is 1 and the
# experts' optimizer states are not sharded further (~3B expert parameters a GPU): OFFLOAD stays on.
: "${ACTOR_TP:=2}" "${ACTOR_PP:=2}" "${ACTOR_CP:=1}" "${ACTOR_EP:=16}" "${ACTOR_ETP:=1}"
# ~220 GB of bf16 weights: one node (TP=8) per rollout replica, four replicas.
: "${ROLLOUT_TP:=8}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

run_verl "${COMMON_ARGS[@]}" \
    "${RL_OCC_ARGS[@]}" \
    "$@"
