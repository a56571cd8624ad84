#!/usr/bin/env bash
# Shared launcher for the paper's settings on verl 0.9.1 (one 8-GPU node). Called by the per-model
# scripts beside it; every variable below can be overridden from the environment, and extra
# arguments are passed to verl as hydra overrides.
#
#   MODEL            HF id or local path of the policy
#   METHOD           sfpo | grpo | none (SFPO keys given as arguments)
#   MAX_PROMPT_LEN   MAX_RESPONSE_LEN   (the paper: 4096 context for Qwen2.5-Math, 8192 for R1-Distill)
#   TRAIN_FILES      VAL_FILES          verl-format parquet files (the paper: DAPO + MATH, ~24k prompts)
#   K  ALPHA  ZSCORE_WINDOW  ZSCORE_THRESHOLD   SFPO's K, alpha_0, omega, tau
set -euo pipefail

: "${MODEL:?set MODEL}"
: "${METHOD:=sfpo}"
: "${MAX_PROMPT_LEN:=1024}"
: "${MAX_RESPONSE_LEN:=3072}"
: "${TRAIN_FILES:=$HOME/data/dapo_math/train.parquet}"
: "${VAL_FILES:=$HOME/data/dapo_math/test.parquet}"
: "${K:=3}"
: "${ALPHA:=0.8}"
: "${ZSCORE_WINDOW:=30}"
: "${ZSCORE_THRESHOLD:=1.0}"
: "${N_GPUS:=8}"
: "${TOTAL_STEPS:=400}"
: "${PROJECT:=sfpo-verl}"
: "${EXPERIMENT:=$(basename "$MODEL")-$METHOD}"

case "$METHOD" in
  sfpo) METHOD_ARGS=(
          actor_rollout_ref.actor.sfpo.enable=true
          actor_rollout_ref.actor.sfpo.inner_steps="$K"
          actor_rollout_ref.actor.sfpo.alpha="$ALPHA"
          actor_rollout_ref.actor.sfpo.zscore_window="$ZSCORE_WINDOW"
          actor_rollout_ref.actor.sfpo.zscore_threshold="$ZSCORE_THRESHOLD") ;;
  grpo) METHOD_ARGS=(actor_rollout_ref.actor.sfpo.enable=false) ;;
  none) METHOD_ARGS=() ;;  # the caller passes the SFPO keys itself (authors-keys-sfpo.sh)
  *) echo "METHOD must be sfpo, grpo or none, got $METHOD" >&2; exit 2 ;;
esac

max_len=$((MAX_PROMPT_LEN + MAX_RESPONSE_LEN))

# The paper: batch 256 prompts x 8 responses, lr 1e-6, mini-batch 64 prompts, GRPO advantages,
# KL loss to the reference, 400 steps; SFPO K=3, alpha=0.8.
exec python -m sfpo_train.verl.main \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=false \
  data.train_files="$TRAIN_FILES" \
  data.val_files="$VAL_FILES" \
  data.train_batch_size=256 \
  data.max_prompt_length="$MAX_PROMPT_LEN" \
  data.max_response_length="$MAX_RESPONSE_LEN" \
  data.filter_overlong_prompts=true \
  data.truncation=error \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.use_remove_padding=true \
  actor_rollout_ref.model.enable_gradient_checkpointing=true \
  actor_rollout_ref.actor.strategy=fsdp2 \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=64 \
  actor_rollout_ref.actor.use_dynamic_bsz=true \
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$((max_len * 2)) \
  actor_rollout_ref.actor.use_kl_loss=true \
  actor_rollout_ref.actor.kl_loss_coef=0.001 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true \
  actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$((max_len * 4)) \
  actor_rollout_ref.ref.log_prob_use_dynamic_bsz=true \
  actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=$((max_len * 4)) \
  trainer.n_gpus_per_node="$N_GPUS" \
  trainer.nnodes=1 \
  trainer.total_training_steps="$TOTAL_STEPS" \
  trainer.save_freq=50 \
  trainer.test_freq=25 \
  trainer.logger='["console","wandb"]' \
  trainer.project_name="$PROJECT" \
  trainer.experiment_name="$EXPERIMENT" \
  "${METHOD_ARGS[@]}" \
  "$@"
