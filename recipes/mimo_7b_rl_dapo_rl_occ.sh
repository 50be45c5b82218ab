#!/usr/bin/env bash
# MiMo-7B-RL, DAPO, MTP trained jointly with the RL policy loss and OCC: the setting of
# arXiv 2605.28184. The MTP head's log-probs of the sampled tokens get the actor's own policy loss
# (same advantages, old log-probs and clipping), its gradient reaches the shared trunk, and OCC sets
# the coefficient each micro-batch from the data (lambda = lambda_plus * <d_RL, d_MTP> / |d_MTP|^2).
#
#   DRY_RUN=1 MODEL_PATH=/models/MiMo-7B-RL bash recipes/mimo_7b_rl_dapo_rl_occ.sh
#   OCC_SCALE=0.5 ROLLOUT=sglang bash recipes/mimo_7b_rl_dapo_rl_occ.sh
#
# Sized for one node of 8 x 80 GB GPUs (MiMo ships its modeling code: trust_remote_code).
# Only dry-run so far (config composition and checks), never launched on GPUs.
set -euo pipefail

: "${MODEL_PATH:=XiaomiMiMo/MiMo-7B-RL}"
# 7B dense: TP=2 (divides MiMo's 8 KV heads) halves weights and, with sequence parallelism, the
# activations of 22k-token sequences; DP takes the rest of the node. No PP/CP needed at this size.
: "${ACTOR_TP:=2}" "${ACTOR_PP:=1}" "${ACTOR_CP:=1}"
# The model fits one GPU; TP=2 replicas leave more KV cache for 16 x 20k-token responses.
: "${ROLLOUT_TP:=2}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# OCC's other settings stay at the paper's values (verl-mtp's defaults): eps 1e-8, no EMA, no clip
# (lambda may go negative; occ_coef_min=0 forbids that). 512 prompts in mini-batches of 32 give 16
# updates per step; only the first is on-policy (pi_theta = pi_old, OCC's numerator is 0) and
# reuses the last measured lambda (occ_on_policy_coef=previous).
run_verl "${COMMON_ARGS[@]}" \
    actor_rollout_ref.model.trust_remote_code=True \
    "${RL_OCC_ARGS[@]}" \
    actor_rollout_ref.model.mtp.occ_on_policy_coef=previous \
    "$@"
