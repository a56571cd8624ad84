"""What each part of the trainer needs from the config, read once when the run is built.

The config (:mod:`sfpo_train.trainer.config`) is validated before any work; the
parts (the actor, the rollout collector, the loop) then get these small frozen
settings at construction and never read the config again. To run a part with
other settings, build new settings from a config with other overrides (or
``dataclasses.replace`` them) and a new part.

Each rule derived from several keys is computed here, once:
responses per mini-batch and per micro-batch (:func:`~sfpo_train.trainer.config.mini_batch_rows`,
:func:`~sfpo_train.trainer.config.micro_batch_rows`) and whether a pass is on-policy
(:meth:`ActorSettings.on_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from sfpo_kernels.loss_options import GRPOLossOptions
from sfpo_train.trainer import config as config_lib
from sfpo_train.trainer.rollout import SamplingSettings
from sfpo_train.trainer.trackers import logger_names


@dataclass(frozen=True)
class ActorSettings:
    """The actor's settings (``actor_rollout_ref.actor.*`` and the log-prob passes' sizes)."""

    loss: GRPOLossOptions  # the loss's options, built once (kl_coef 0 without use_kl_loss)
    kernel_backend: str | None  # sfpo_kernels backend of the loss and log-prob kernels (None: by device)
    fused_lm_head: bool | str  # True, False or "auto" (resolved against the model by the Actor)
    ppo_epochs: int
    mini_batch_rows: int  # responses per optimizer step
    micro_batch_rows: int  # responses per forward/backward of the update pass
    shuffle: bool
    clip_grad: float
    reuse_old_log_probs: bool  # old_log_prob_from_update=auto
    log_prob_micro_rows: int  # responses per forward of the old-log-prob pass
    ref_log_prob_micro_rows: int  # responses per forward of the reference pass

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ActorSettings:
        arr = cfg.actor_rollout_ref
        actor = arr.actor
        return cls(
            loss=config_lib.loss_options(cfg),
            kernel_backend=actor.kernel_backend,
            fused_lm_head=arr.model.fused_lm_head,
            ppo_epochs=actor.ppo_epochs,
            mini_batch_rows=config_lib.mini_batch_rows(cfg),
            micro_batch_rows=config_lib.micro_batch_rows(cfg),
            shuffle=actor.shuffle,
            clip_grad=actor.optim.clip_grad,
            reuse_old_log_probs=str(actor.old_log_prob_from_update).lower() == "auto",
            log_prob_micro_rows=arr.rollout.log_prob_micro_batch_size_per_gpu,
            ref_log_prob_micro_rows=arr.ref.log_prob_micro_batch_size_per_gpu,
        )

    def on_policy(self, n_rows: int) -> bool:
        """Whether an update pass over ``n_rows`` responses sees theta_0 at every forward.

        One epoch and one mini-batch: the pass's only optimizer step comes after its last
        forward (micro-batches accumulate gradients, never change a parameter).
        """
        return self.ppo_epochs == 1 and n_rows <= self.mini_batch_rows


@dataclass(frozen=True)
class CollectSettings:
    """Generation, reward and dynamic sampling (``rollout.*``, ``data.train_batch_size``, ``filter_groups.*``)."""

    n: int  # responses per prompt
    train_batch_size: int  # prompts (groups) per iteration
    train_sampling: SamplingSettings
    val_sampling: SamplingSettings
    filter_groups: bool
    filter_metric: str  # acc | score
    max_num_gen_batches: int  # <= 0: no limit

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CollectSettings:
        rollout, filtering = cfg.actor_rollout_ref.rollout, cfg.algorithm.filter_groups

        def sampling(s) -> SamplingSettings:
            return SamplingSettings(
                n=s.n,
                do_sample=s.do_sample,
                temperature=s.temperature if s.do_sample else 1.0,
                top_p=s.top_p,
                top_k=s.top_k,
                max_new_tokens=cfg.data.max_response_length,
            )

        return cls(
            n=rollout.n,
            train_batch_size=cfg.data.train_batch_size,
            train_sampling=sampling(rollout),
            val_sampling=sampling(rollout.val_kwargs),
            filter_groups=filtering.enable,
            filter_metric=filtering.metric,
            max_num_gen_batches=filtering.max_num_gen_batches,
        )


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own schedule (``trainer.*``, advantages, validation batch size)."""

    n: int
    norm_adv_by_std: bool
    val_batch_size: int
    total_training_steps: int
    test_freq: int
    save_freq: int
    val_before_train: bool
    progress_bar: bool
    experiment_name: str | None
    project_name: str
    logger: tuple[str, ...]  # trainer.logger: the backends beside metrics.jsonl (trackers.py)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> LoopSettings:
        t = cfg.trainer
        return cls(
            n=cfg.actor_rollout_ref.rollout.n,
            norm_adv_by_std=cfg.algorithm.norm_adv_by_std_in_grpo,
            val_batch_size=cfg.data.val_batch_size,
            total_training_steps=t.total_training_steps,
            test_freq=t.test_freq,
            save_freq=t.save_freq,
            val_before_train=t.val_before_train,
            progress_bar=t.progress_bar,
            experiment_name=t.experiment_name,
            project_name=t.project_name,
            logger=tuple(logger_names(t.logger)),
        )
