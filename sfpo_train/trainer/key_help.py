"""What every key of the standalone trainer's configuration means: ``sfpo train --help`` prints it.

One entry per key of :mod:`sfpo_train.trainer.config` (a test checks the two
sets are equal); SFPO's keys take the help text of ``SFPOConfig``'s fields.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from sfpo_train.sfpo import settings_schema
from sfpo_train.trainer.config import TrainerConfig, config_keys

KEY_HELP: dict[str, str] = {
    "data.train_files": "training prompts, a parquet file in verl's layout (default: the embedded addition task)",
    "data.val_files": "validation prompts, same layout (default: the embedded task's 500 test problems)",
    "data.prompt_key": "column holding the prompt (chat messages or a string)",
    "data.reward_fn_key": "column routing the reward function (verl: data_source)",
    "data.train_batch_size": "prompts per iteration",
    "data.val_batch_size": "prompts per generate call during validation",
    "data.val_max_samples": "validate on the first N prompts only (-1: all)",
    "data.max_prompt_length": "longest prompt in tokens; a longer one is an error before training",
    "data.max_response_length": "tokens generated per response at most",
    "data.shuffle": "a new permutation of the training prompts every epoch",
    "data.seed": "seed of the data order",
    "actor_rollout_ref.model.path": "a local transformers causal LM directory (default: the embedded model)",
    "actor_rollout_ref.model.dtype": "compute dtype, fp32 | bf16 | fp16 (autocast; parameters stay fp32)",
    "actor_rollout_ref.model.override_config": "transformers config entries to override, e.g. {num_hidden_layers: 4}",
    "actor_rollout_ref.model.random_init": "start from random weights (model.path gives config and tokenizer)",
    "actor_rollout_ref.model.attn_implementation": "transformers attention: sdpa | eager | flash_attention_2",
    "actor_rollout_ref.model.fused_lm_head": "auto | true | false: run the base model and fuse the LM head into the "
    "loss and log-prob passes (no [tokens, vocab] logits, response tokens "
    "only); auto: on for CUDA, where the logits are the memory peak; off on "
    "CPU, where the models are small (the embedded one has 16 tokens: its "
    "logits are smaller than its hidden states) and runs stay bit-identical "
    "to the model's-logits path; true on a model whose head cannot be fused "
    "(not a plain Linear, soft-capped or scaled logits) is an error",
    "actor_rollout_ref.actor.ppo_mini_batch_size": "prompts per optimizer step (must divide data.train_batch_size)",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "responses per forward/backward (gradient accumulation)",
    "actor_rollout_ref.actor.ppo_epochs": "passes over the batch per update pass",
    "actor_rollout_ref.actor.shuffle": "shuffle responses before splitting into mini-batches",
    "actor_rollout_ref.actor.clip_ratio_low": "PPO clip: ratio >= 1 - clip_ratio_low",
    "actor_rollout_ref.actor.clip_ratio_high": "PPO clip: ratio <= 1 + clip_ratio_high (DAPO's clip-higher: 0.28)",
    "actor_rollout_ref.actor.clip_ratio_c": "dual-clip bound for negative advantages (> 1; null: off)",
    "actor_rollout_ref.actor.loss_agg_mode": "token-mean | token-sum | seq-mean-token-sum | seq-mean-token-mean | "
    "seq-mean-token-sum-norm (Dr. GRPO)",
    "actor_rollout_ref.actor.entropy_coeff": "entropy bonus coefficient",
    "actor_rollout_ref.actor.use_kl_loss": "add a KL penalty to a frozen reference (the starting model)",
    "actor_rollout_ref.actor.kl_loss_coef": "KL penalty coefficient",
    "actor_rollout_ref.actor.kl_loss_type": "kl/k1 | abs | mse/k2 | low_var_kl/k3 (a '+' takes the k2 gradient)",
    "actor_rollout_ref.actor.kernel_backend": "loss kernels: triton | torch | null (triton on GPU, torch on CPU)",
    "actor_rollout_ref.actor.old_log_prob_from_update": "auto: when on-policy (ppo_epochs=1, one mini-batch, no dropout) "
    "the first update pass's forward gives the old log-probs and "
    "entropy, no separate pass | false: always the separate pass",
    "actor_rollout_ref.actor.optim.lr": "AdamW learning rate (actor/lr logs the rate each iteration used)",
    "actor_rollout_ref.actor.optim.weight_decay": "AdamW weight decay",
    "actor_rollout_ref.actor.optim.betas": "AdamW betas, e.g. [0.9,0.999]",
    "actor_rollout_ref.actor.optim.eps": "AdamW epsilon",
    "actor_rollout_ref.actor.optim.lr_warmup_steps": "linear warm-up iterations, lr from 0 (<= 0: use lr_warmup_steps_ratio)",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": "warm-up as a fraction of total_training_steps",
    "actor_rollout_ref.actor.optim.lr_scheduler_type": "after warm-up: constant | cosine",
    "actor_rollout_ref.actor.optim.min_lr_ratio": "cosine floor as a fraction of lr",
    "actor_rollout_ref.actor.optim.clip_grad": "max gradient norm per optimizer step",
    "actor_rollout_ref.rollout.name": "rollout engine: hf (transformers generate) | vllm (optional extra, CPU or GPU)",
    "actor_rollout_ref.rollout.n": "responses per prompt (the GRPO group size)",
    "actor_rollout_ref.rollout.temperature": "sampling temperature (also divides the logits in the loss)",
    "actor_rollout_ref.rollout.top_p": "nucleus sampling",
    "actor_rollout_ref.rollout.top_k": "top-k sampling (-1: off)",
    "actor_rollout_ref.rollout.do_sample": "sample (false: greedy)",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "responses per forward of the old-log-prob pass",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "vLLM's share of GPU memory (its KV cache on a GPU)",
    "actor_rollout_ref.rollout.kv_cache_memory_gb": "vLLM's KV cache in GiB (null: gpu_memory_utilization on a GPU, "
    "twice one generation batch at full length on the CPU, in [64 MiB, "
    "a quarter of the free RAM])",
    "actor_rollout_ref.rollout.val_kwargs.do_sample": "sample during validation (false: greedy)",
    "actor_rollout_ref.rollout.val_kwargs.temperature": "validation temperature (with do_sample)",
    "actor_rollout_ref.rollout.val_kwargs.top_p": "validation top-p (with do_sample)",
    "actor_rollout_ref.rollout.val_kwargs.top_k": "validation top-k (with do_sample; -1: off)",
    "actor_rollout_ref.rollout.val_kwargs.n": "responses per validation prompt (1)",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": "responses per forward of the reference pass",
    "algorithm.adv_estimator": "advantage estimator: grpo",
    "algorithm.norm_adv_by_std_in_grpo": "divide by the group's std (false: Dr. GRPO)",
    "algorithm.filter_groups.enable": "DAPO dynamic sampling: drop groups with equal rewards, refill the batch",
    "algorithm.filter_groups.metric": "what must differ within a group: score, or acc (a reward dict's 'acc' entry, else the score)",
    "algorithm.filter_groups.max_num_gen_batches": "give up after this many generation batches (<= 0: never)",
    "custom_reward_function.path": "a .py file with compute_score(data_source, solution_str, ground_truth, extra_info); "
    "it is imported, so its code runs as the user running sfpo train (as in verl): "
    "only give a file you trust",
    "custom_reward_function.name": "the function's name in that file",
    "trainer.project_name": "project name (recorded in the run's config)",
    "trainer.experiment_name": "run name; the run lives in default_local_dir/experiment_name (default: preset-[sfpo-]algorithm-time)",
    "trainer.default_local_dir": "where runs are written",
    "trainer.total_training_steps": "RL iterations",
    "trainer.test_freq": "validate every N iterations and at the end (<= 0: only at the end)",
    "trainer.save_freq": "checkpoint every N iterations and at the end (<= 0: never)",
    "trainer.val_before_train": "validate the starting model first",
    "trainer.device": "auto | cpu | cuda",
    "trainer.seed": "seed of sampling and initialisation",
    "trainer.progress_bar": "show the progress bar",
    # SFPO's keys: the help text of sfpo_train.SFPOConfig's fields
    **{f"actor_rollout_ref.actor.sfpo.{s.name}": s.help for s in settings_schema(enable_default=True)},
}


def describe_keys(cfg: DictConfig | None = None) -> str:
    """Every key with its value in ``cfg`` (default: the defaults) and what it means, for ``--help``."""
    cfg = cfg if cfg is not None else OmegaConf.structured(TrainerConfig)
    lines, section = [], None
    for key in config_keys():
        head = key.rsplit(".", 1)[0]
        if head != section:
            lines.append(f"  {head}.")
            section = head
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig) or hasattr(value, "_content"):
            value = OmegaConf.to_container(value)
        lines.append(f"    {key.rsplit('.', 1)[1]}={json_value(value)}  -- {KEY_HELP.get(key, '')}")
    return "\n".join(lines)


def json_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return str(value).replace(" ", "")
    return str(value)
