#!/usr/bin/env bash
# Qwen/Qwen2.5-Math-7B, sfpo (paper setting: batch 256, n 8, lr 1e-6, mini-batch 64, K 3, alpha 0.8).
# Extra arguments are verl hydra overrides, e.g. data.train_files=... trainer.n_gpus_per_node=4
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B} METHOD=sfpo MAX_PROMPT_LEN=${MAX_PROMPT_LEN:-1024} MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN:-3072} \
  exec "$(dirname "$0")/common.sh" "$@"
