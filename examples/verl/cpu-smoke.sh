#!/usr/bin/env bash
# SFPO inside verl 0.9.1's real job on a CPU-only host: Ray, TransferQueue, the agent loop, the hf rollout
# server with weight sync, verl's sync trainer loop, checkpoints, the KL loss to the reference model.
# Task and model: the embedded 3-digit addition problems and their tiny Qwen2 (sfpo_train/assets/addition).
#
#   examples/verl/cpu-smoke.sh OUT [hydra overrides ...]
#
#   OUT                 directory for everything the run writes: checkpoints (OUT/checkpoints), the console
#                       log (OUT/run.log, appended to), verl's metrics (OUT/metrics/<time>.jsonl, one
#                       file per invocation), hydra's files of the run (OUT/hydra/<time>/; nothing is
#                       written to the current directory)
#   SFPO_SMOKE_RANKS    FSDP2 ranks, 1 or 2 (default 1); each is a Ray worker holding one logical GPU
#   overrides           passed to verl last, so they win, e.g.
#                         trainer.total_training_steps=3 trainer.resume_mode=auto
#                         trainer.device=cuda                      (on a GPU host, same hf rollout)
#                         actor_rollout_ref.actor.sfpo.enable=false (verl's GRPO through the same job)
#
# Two iterations by default; run it again on the same OUT with trainer.total_training_steps=3 to resume
# from the step-2 checkpoint (trainer.resume_mode=auto is the default here). About 2-4 minutes per run on
# 2 CPU cores, 90 s of it start-up. See docs/verl.md ("verl's Ray job on CPU").
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
OUT=$1
shift
RANKS=${SFPO_SMOKE_RANKS:-1}
if [[ "$RANKS" != 1 && "$RANKS" != 2 ]]; then
  echo "SFPO_SMOKE_RANKS must be 1 or 2, got '$RANKS'" >&2
  exit 2
fi
mkdir -p "$OUT/metrics"
OUT=$(cd "$OUT" && pwd)
STAMP="$(date -u +%Y%m%dT%H%M%S)-$$"
METRICS="$OUT/metrics/$STAMP.jsonl"
PYTHON=${PYTHON:-python}
ASSETS=$("$PYTHON" -c "from sfpo_train.tasks import TASK_ASSETS; print(TASK_ASSETS['addition'])")
SCORER=$("$PYTHON" -c "import inspect, sfpo_train.tasks as t; print(inspect.getsourcefile(t))")

# 8 prompts x 4 responses per iteration, one mini-batch (so each SFPO pass is one optimizer step);
# fp32 and eager attention on CPU; no validation pass (500 test problems would dominate the run).
set -x
"$PYTHON" -m sfpo_train.verl.main \
  hydra.run.dir="$OUT/hydra/$STAMP" \
  trainer.device=cpu \
  trainer.n_gpus_per_node="$RANKS" \
  trainer.nnodes=1 \
  trainer.total_training_steps=2 \
  trainer.save_freq=1 \
  trainer.test_freq=-1 \
  trainer.val_before_train=false \
  trainer.resume_mode=auto \
  trainer.default_local_dir="$OUT/checkpoints" \
  trainer.logger='["console","file"]' \
  +ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="$METRICS" \
  trainer.project_name=sfpo-cpu-smoke \
  trainer.experiment_name="sfpo-addition-${RANKS}rank" \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=false \
  data.train_files="$ASSETS/train.parquet" \
  data.val_files="$ASSETS/test.parquet" \
  data.train_batch_size=8 \
  data.max_prompt_length=8 \
  data.max_response_length=5 \
  data.dataloader_num_workers=0 \
  reward.custom_reward_function.path="$SCORER" \
  reward.custom_reward_function.name=compute_score \
  actor_rollout_ref.model.path="$ASSETS/model" \
  actor_rollout_ref.model.use_remove_padding=false \
  actor_rollout_ref.actor.optim.lr=1e-4 \
  actor_rollout_ref.actor.ppo_mini_batch_size=8 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
  actor_rollout_ref.actor.use_kl_loss=true \
  actor_rollout_ref.actor.kl_loss_coef=0.001 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.entropy_coeff=0 \
  '+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}' \
  actor_rollout_ref.actor.fsdp_config.use_torch_compile=false \
  actor_rollout_ref.ref.fsdp_config.use_torch_compile=false \
  actor_rollout_ref.ref.fsdp_config.model_dtype=fp32 \
  '+actor_rollout_ref.ref.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}' \
  actor_rollout_ref.rollout.name=hf \
  actor_rollout_ref.rollout.dtype=float32 \
  actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
  actor_rollout_ref.actor.sfpo.enable=true \
  actor_rollout_ref.actor.sfpo.inner_steps=3 \
  actor_rollout_ref.actor.sfpo.alpha=0.8 \
  "$@" 2>&1 | tee -a "$OUT/run.log"
