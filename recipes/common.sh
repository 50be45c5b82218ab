# shellcheck shell=bash
# Shared part of every recipe in this directory. Sourced, never run on its own.
#
# A recipe sets its model's defaults with ': "${VAR:=value}"' (so the environment always wins),
# sources this file, and ends with
#     run_verl "${COMMON_ARGS[@]}" <its own overrides> "$@"
# The recipe's command-line arguments come last, so they override anything set before them.
#
# Environment (a recipe may change a default; see recipes/README.md for the full table):
#   DRY_RUN         0 | 1 | json   0 = launch training; 1 = compose and validate the config and print
#                                  verl-mtp's MTP plan, launch nothing; json = the same, plan as JSON
#   ROLLOUT         vllm | sglang  rollout engine (actor_rollout_ref.rollout.name)
#   SPEC            1 | 0          MTP head as the drafter for speculative rollout
#   SPEC_TOKENS     draft tokens per decoding step (vLLM num_speculative_tokens; SGLang chain length)
#   NNODES, GPUS_PER_NODE, MODEL_PATH, TRAIN_FILES, VAL_FILES, CKPT_DIR, PROJECT, EXP_NAME
#   ACTOR_TP/PP/CP/EP/ETP, OFFLOAD, ROLLOUT_TP/DP/EP, ROLLOUT_GPU_MEM   parallelism and memory
#   MAX_PROMPT_LEN, MAX_RESPONSE_LEN, OVERLONG_BUFFER_LEN, TRAIN_BATCH_SIZE, MINI_BATCH_SIZE,
#   N_RESP, LR, TOKENS_PER_GPU, LOGGER, PYTHON, OCC_SCALE / MTP_REGIME / DRAFTER_LOSS (the *_rl_occ recipes)

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE_NAME="$(basename "$0")"

recipe_fail() {
    echo "$RECIPE_NAME: $*" >&2
    exit 2
}

# check_choice VAR CHOICE... : the variable's value must be one of the choices.
check_choice() {
    local name="$1" value="${!1}" choice list=""
    shift
    for choice in "$@"; do
        [[ "$value" == "$choice" ]] && return 0
        list+="${list:+, }$choice"
    done
    recipe_fail "$name='$value' is invalid: valid choices are $list"
}

# check_int VAR... : each variable must hold a positive integer (they feed shell arithmetic and
# parallel sizes, where a typo would otherwise surface as a bash error or a wrong size).
check_int() {
    local name
    for name in "$@"; do
        [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || recipe_fail "$name='${!name}' is invalid: expected a positive integer"
    done
}

# --- run mode, engine, speculation -------------------------------------------------------------
: "${DRY_RUN:=0}"
: "${ROLLOUT:=vllm}"
: "${SPEC:=1}"
: "${SPEC_TOKENS:=1}"
: "${PYTHON:=python}"
check_choice DRY_RUN 0 1 json
check_choice ROLLOUT vllm sglang
check_choice SPEC 1 0

# --- cluster, paths, names ----------------------------------------------------------------------
: "${NNODES:=1}"
: "${GPUS_PER_NODE:=8}"
: "${MODEL_PATH:?the recipe sets a default MODEL_PATH; set MODEL_PATH to the checkpoint directory}"
: "${TRAIN_FILES:=$HOME/data/dapo-math-17k.parquet}"
: "${VAL_FILES:=$HOME/data/aime-2024.parquet}"
: "${PROJECT:=verl-mtp}"
: "${EXP_NAME:=${RECIPE_NAME%.sh}}"
: "${CKPT_DIR:=$PWD/checkpoints/$PROJECT/$EXP_NAME}"
: "${LOGGER:=[\"console\"]}"   # e.g. LOGGER='["console","wandb"]'

# --- parallelism (recipes set model-appropriate defaults) ---------------------------------------
: "${ACTOR_TP:=1}" "${ACTOR_PP:=1}" "${ACTOR_CP:=1}" "${ACTOR_EP:=1}" "${ACTOR_ETP:=1}"
# The actor shares its GPUs with the rollout engine (verl's hybrid engine). With OFFLOAD=True
# verl moves the actor's weights and optimizer states to host memory while the engine generates,
# at the cost of host<->device copies every step; False when the GPUs hold both.
: "${OFFLOAD:=True}"
check_choice OFFLOAD True False
: "${ROLLOUT_TP:=1}" "${ROLLOUT_DP:=1}" "${ROLLOUT_EP:=1}"
: "${ROLLOUT_GPU_MEM:=0.7}"

# --- DAPO sizes (the DAPO paper's setting: 2k prompt, 20k response of which the last 4k are the
# overlong-penalty buffer, 512 prompts x 16 responses per step, 32 prompts per mini-batch) ------
: "${MAX_PROMPT_LEN:=2048}"
: "${MAX_RESPONSE_LEN:=20480}"
: "${OVERLONG_BUFFER_LEN:=4096}"
: "${TRAIN_BATCH_SIZE:=512}"
: "${MINI_BATCH_SIZE:=32}"
: "${N_RESP:=16}"
: "${LR:=1e-6}"
check_int NNODES GPUS_PER_NODE SPEC_TOKENS ACTOR_TP ACTOR_PP ACTOR_CP ACTOR_EP ACTOR_ETP \
    ROLLOUT_TP ROLLOUT_DP ROLLOUT_EP MAX_PROMPT_LEN MAX_RESPONSE_LEN OVERLONG_BUFFER_LEN \
    TRAIN_BATCH_SIZE MINI_BATCH_SIZE N_RESP
(( OVERLONG_BUFFER_LEN < MAX_RESPONSE_LEN )) ||
    recipe_fail "OVERLONG_BUFFER_LEN=$OVERLONG_BUFFER_LEN is invalid: expected less than MAX_RESPONSE_LEN=$MAX_RESPONSE_LEN"
# Token budget of one micro-batch per GPU with dynamic batch sizes: two full-length sequences.
: "${TOKENS_PER_GPU:=$(( 2 * (MAX_PROMPT_LEN + MAX_RESPONSE_LEN) ))}"
check_int TOKENS_PER_GPU

COMMON_ARGS=(
    # data
    "data.train_files=$TRAIN_FILES"
    "data.val_files=$VAL_FILES"
    "data.max_prompt_length=$MAX_PROMPT_LEN"
    "data.max_response_length=$MAX_RESPONSE_LEN"
    "data.train_batch_size=$TRAIN_BATCH_SIZE"
    data.filter_overlong_prompts=True
    data.truncation=left

    # model
    "actor_rollout_ref.model.path=$MODEL_PATH"

    # DAPO on verl's GRPO: group-normalised advantages, no KL anywhere, token-mean loss
    # aggregation, decoupled clip range (clip-higher: 0.2 below, 0.28 above), dual-clip bound 10.
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=False
    algorithm.kl_ctrl.kl_coef=0.0
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.kl_loss_coef=0.0
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.clip_ratio_low=0.2
    actor_rollout_ref.actor.clip_ratio_high=0.28
    actor_rollout_ref.actor.clip_ratio_c=10.0
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    # DAPO dynamic sampling: drop groups whose 16 responses are all right or all wrong (zero
    # advantage). verl's v1 trainer refills from new prompts. "acc" is reported by verl's
    # math_dapo scorer; with another reward function use a key it returns (or "reward").
    algorithm.filter_groups.enable=True
    algorithm.filter_groups.metric=acc
    # DAPO overlong reward shaping: a linear penalty over the last OVERLONG_BUFFER_LEN tokens.
    # verl 0.9.1's dapo reward manager reads reward.reward_kwargs, which its YAML does not
    # declare, hence '++' (add or override): a misspelling below these keys is NOT caught by the
    # dry run.
    reward.reward_manager.name=dapo
    "++reward.reward_kwargs.max_resp_len=$MAX_RESPONSE_LEN"
    ++reward.reward_kwargs.overlong_buffer_cfg.enable=True
    "++reward.reward_kwargs.overlong_buffer_cfg.len=$OVERLONG_BUFFER_LEN"
    ++reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0
    ++reward.reward_kwargs.overlong_buffer_cfg.log=False

    # optimisation (DAPO: lr 1e-6, 10 warm-up steps, weight decay 0.1, grad clip 1.0)
    "actor_rollout_ref.actor.optim.lr=$LR"
    actor_rollout_ref.actor.optim.lr_warmup_steps=10
    actor_rollout_ref.actor.optim.weight_decay=0.1
    actor_rollout_ref.actor.optim.clip_grad=1.0
    "actor_rollout_ref.actor.ppo_mini_batch_size=$MINI_BATCH_SIZE"
    # Long responses vary a lot in length: pack micro-batches by tokens, not by count.
    actor_rollout_ref.actor.use_dynamic_bsz=True
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$TOKENS_PER_GPU"

    # Megatron engine
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=$ACTOR_TP"
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=$ACTOR_PP"
    "actor_rollout_ref.actor.megatron.context_parallel_size=$ACTOR_CP"
    "actor_rollout_ref.actor.megatron.expert_model_parallel_size=$ACTOR_EP"
    "actor_rollout_ref.actor.megatron.expert_tensor_parallel_size=$ACTOR_ETP"
    "actor_rollout_ref.actor.megatron.param_offload=$OFFLOAD"
    "actor_rollout_ref.actor.megatron.optimizer_offload=$OFFLOAD"
    # 20k-token sequences: recompute every layer in backward instead of keeping activations.
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
    actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1

    # rollout (DAPO samples at temperature 1.0, top_p 1.0; validation at top_p 0.7, sampled)
    "actor_rollout_ref.rollout.name=$ROLLOUT"
    "actor_rollout_ref.rollout.n=$N_RESP"
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.top_k=-1
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0
    actor_rollout_ref.rollout.val_kwargs.top_p=0.7
    actor_rollout_ref.rollout.val_kwargs.n=1
    "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP"
    "actor_rollout_ref.rollout.data_parallel_size=$ROLLOUT_DP"
    "actor_rollout_ref.rollout.expert_parallel_size=$ROLLOUT_EP"
    "actor_rollout_ref.rollout.gpu_memory_utilization=$ROLLOUT_GPU_MEM"
    # one full-length sequence fits one prefill batch
    "actor_rollout_ref.rollout.max_num_batched_tokens=$(( MAX_PROMPT_LEN + MAX_RESPONSE_LEN ))"

    # trainer
    "trainer.nnodes=$NNODES"
    "trainer.n_gpus_per_node=$GPUS_PER_NODE"
    "trainer.project_name=$PROJECT"
    "trainer.experiment_name=$EXP_NAME"
    "trainer.default_local_dir=$CKPT_DIR"
    "trainer.logger=$LOGGER"
    trainer.val_before_train=True
    trainer.test_freq=10
    trainer.save_freq=10
    trainer.resume_mode=auto
)

# Speculative rollout with the MTP head as the drafter. The keys are verl's own; verl passes them
# to the engine (vLLM: speculative_config; SGLang: the speculative_* server arguments).
if [[ "$SPEC" == 1 ]]; then
    COMMON_ARGS+=(actor_rollout_ref.model.mtp.enable_rollout=True)
    if [[ "$ROLLOUT" == vllm ]]; then
        # "mtp" lets vLLM pick the model's MTP drafter (vLLM >= 0.11; the family names such as
        # deepseek_mtp are deprecated aliases of it, and older vLLM never syncs the drafter under verl).
        COMMON_ARGS+=(
            "actor_rollout_ref.model.mtp.method=${VLLM_SPEC_METHOD:-mtp}"
            "actor_rollout_ref.model.mtp.num_speculative_tokens=$SPEC_TOKENS"
        )
    else
        # A chain (top-k 1) of SPEC_TOKENS steps, verified as SPEC_TOKENS + 1 tokens. RL rollout
        # batches are large, where long or branching drafts cost more than they save; the one MTP
        # layer is reused for every step beyond the first, with falling acceptance.
        COMMON_ARGS+=(
            "actor_rollout_ref.model.mtp.speculative_algorithm=${SGLANG_SPEC_ALGO:-EAGLE}"
            "actor_rollout_ref.model.mtp.speculative_num_steps=$SPEC_TOKENS"
            actor_rollout_ref.model.mtp.speculative_eagle_topk=1
            "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=$(( SPEC_TOKENS + 1 ))"
        )
    fi
else
    COMMON_ARGS+=(actor_rollout_ref.model.mtp.enable_rollout=False)
fi

# --- the paper's MTP objective (arXiv 2605.28184), used by every *_rl_occ recipe ----------------
# The actor's policy loss on the MTP head with OCC's coefficient. OCC's other settings stay at the
# paper's values (verl-mtp's defaults): eps 1e-8, no EMA, no clip (lambda may go negative; add
# actor_rollout_ref.model.mtp.occ_coef_min=0 to forbid that).
#   MTP_REGIME=decoupled (default): OCC's lambda scales the term's gradient into the shared
#     parameters only; the MTP module trains on DRAFTER_LOSS toward the policy it drafts for. In
#     the paper's joint regime the same term also moves the MTP module, at Adam's full step size even
#     when lambda is near 0 or negative, and its drafts fall away from the policy (draft agreement
#     0.47 -> 0.34 on verl-mtp's demo while every cross-entropy regime reached 0.96).
#   MTP_REGIME=joint: the paper's setting, without speculative rollout (SPEC=0) for that reason.
#   DRAFTER_LOSS=tv | kl | ce: the MTP module's loss (decoupled). tv is one minus the acceptance of
#     drafts sampled from the head, so vLLM rollouts draft that way (draft_sample_method=probabilistic);
#     SGLang has no such setting and drafts greedily.
: "${OCC_SCALE:=1.0}"   # OCC's lambda_plus; the paper uses 1
: "${MTP_REGIME:=decoupled}" "${DRAFTER_LOSS:=tv}"
check_choice MTP_REGIME decoupled joint
check_choice DRAFTER_LOSS tv kl ce
RL_OCC_ARGS=(
    "actor_rollout_ref.model.mtp.mtp_training_mode=$MTP_REGIME"
    actor_rollout_ref.model.mtp.mtp_loss_type=rl
    actor_rollout_ref.model.mtp.mtp_coef_mode=occ
    "actor_rollout_ref.model.mtp.occ_scale=$OCC_SCALE"
)
if [[ "$MTP_REGIME" == decoupled ]]; then
    RL_OCC_ARGS+=("actor_rollout_ref.model.mtp.mtp_drafter_loss=$DRAFTER_LOSS")
    if [[ "$SPEC" == 1 && "$ROLLOUT" == vllm ]]; then
        RL_OCC_ARGS+=(actor_rollout_ref.model.mtp.draft_sample_method=probabilistic)
    fi
elif [[ "$SPEC" == 1 ]]; then
    recipe_fail "MTP_REGIME=joint with SPEC=1: the policy-loss term with OCC's lambda trains the MTP module away from the policy it drafts for; set SPEC=0 or MTP_REGIME=decoupled"
fi

# run_verl OVERRIDE... : launch verl's PPO trainer with verl-mtp's wrapper config, or (DRY_RUN)
# compose and check exactly that config and print the MTP plan.
run_verl() {
    local entry=(-m verl.trainer.main_ppo --config-path=pkg://verl_mtp.conf --config-name=ppo_megatron_mtp)
    if [[ "$DRY_RUN" == 0 ]]; then
        exec "$PYTHON" "${entry[@]}" "$@"
    fi
    {
        echo "[$RECIPE_NAME] DRY_RUN=$DRY_RUN: nothing is launched. The training command would be:"
        printf '  %q' "$PYTHON"
        printf ' %q' "${entry[@]}"
        printf ' \\\n      %q' "$@"
        echo
    } >&2
    local fmt=()
    [[ "$DRY_RUN" == json ]] && fmt=(--json)
    exec "$PYTHON" "$RECIPES_DIR/dry_run.py" ${fmt[@]+"${fmt[@]}"} "$@"
}
