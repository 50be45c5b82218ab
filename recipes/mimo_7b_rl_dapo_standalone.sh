#!/usr/bin/env bash
# MiMo-7B-RL, DAPO, MTP head trained "standalone": the head learns the policy's next-next token by
# cross-entropy on the trunk's detached hidden states, so it keeps up as a drafter while nothing
# reaches the policy (verl's MTP guide recommends this for RL; the baseline of arXiv 2605.28184).
#
#   DRY_RUN=1 MODEL_PATH=/models/MiMo-7B-RL bash recipes/mimo_7b_rl_dapo_standalone.sh
#   ROLLOUT=sglang NNODES=2 bash recipes/mimo_7b_rl_dapo_standalone.sh trainer.total_epochs=1
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

run_verl "${COMMON_ARGS[@]}" \
    actor_rollout_ref.model.trust_remote_code=True \
    actor_rollout_ref.model.mtp.mtp_training_mode=standalone \
    actor_rollout_ref.model.mtp.mtp_loss_type=ce \
    actor_rollout_ref.model.mtp.mtp_coef_mode=fixed \
    actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1 \
    "$@"
