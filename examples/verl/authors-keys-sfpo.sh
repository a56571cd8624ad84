#!/usr/bin/env bash
# The paper authors' key names, unchanged from their scripts, on our entry point (same run as
# qwen2.5-math-1.5b-sfpo.sh). Their keys and ours may be mixed; two different values for one
# setting are an error.
MODEL=${MODEL:-Qwen/Qwen2.5-Math-1.5B} METHOD=none exec "$(dirname "$0")/common.sh" \
  +actor_rollout_ref.actor.use_sfpo=True \
  +actor_rollout_ref.actor.sfpo_inner_steps=3 \
  +actor_rollout_ref.actor.sfpo_step_size=0.8 \
  +actor_rollout_ref.actor.zscore_w=30 \
  +actor_rollout_ref.actor.zscore_threshold=1.0 \
  "$@"
