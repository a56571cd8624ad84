#!/usr/bin/env bash
# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, grpo (paper setting: batch 256, n 8, lr 1e-6, mini-batch 64).
# Extra arguments are verl hydra overrides, e.g. data.train_files=... trainer.n_gpus_per_node=4
MODEL=${MODEL:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B} METHOD=grpo MAX_PROMPT_LEN=${MAX_PROMPT_LEN:-1024} MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN:-7168} \
  exec "$(dirname "$0")/common.sh" "$@"
