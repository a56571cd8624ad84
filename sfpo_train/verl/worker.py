"""SFPO inside verl 0.9.1's actor worker, by subclassing (no fork of verl).

SFPO itself patches nothing: it subclasses verl's workers. The one patch in the
plugin is opt-in, ``fused_kernels``: :func:`sfpo_train.verl.fused.install_logprob_forward`
replaces, in this worker's process, the ``forward`` that verl patched onto the HF
model class for ``model.use_fused_kernels=True`` (see :mod:`sfpo_train.verl.fused`).

verl's actor update runs ``ActorRolloutRefWorker.update_actor`` ->
``TrainingWorker.train_mini_batch(TensorDict)``: split the batch into
mini-batches, one optimizer step each (the engine's ``train_batch`` with
``ppo_loss``), the LR scheduler stepped after the last one. One call is one
GRPO "pass" in SFPO's sense, so :class:`SFPOTrainingWorker` runs
``SFPO.step(pass, batch, entropy)`` around it:

    theta_0 = snapshot;  K passes;  theta <- theta_0 + alpha (theta_K - theta_0);  one more pass

with three things verl would otherwise get wrong:

- ``train_mini_batch`` pops its metadata keys (``mini_batch_size``, ``epochs``,
  ...) from the input, so every pass gets its own shallow copy of the batch;
- it steps the LR scheduler, which would step K+1 times per iteration: every
  pass but the last runs with ``update_lr_scheduler=False`` (see
  :meth:`SFPOTrainingWorker.train_batch`), so the scheduler steps once;
- under FSDP2 the parameters are ``DTensor`` shards; ``sfpo_kernels`` snapshots
  and repositions their local shards (every rank does the same lerp on its own
  shard, so no communication is needed).

The trigger reads the iteration's entropy as verl computes it (``actor/entropy``,
the old-log-prob pass), which :class:`~sfpo_train.verl.trainer.SFPOTrainer`
passes to the worker as the non-tensor key ``sfpo_entropy``; with
``trigger_entropy=last_pass`` it reads the last update pass's ``actor/entropy_loss``
instead (the plugin turns on ``actor.calculate_entropy`` for that). SFPO's schedule
state is saved as ``sfpo_state.json`` beside the actor's checkpoint (rank 0) and,
on resume, read by rank 0 and broadcast. Every iteration all ranks check with
one tiny all-reduce that they hold the same schedule (alpha, trigger, window)
and that the LR scheduler stepped exactly once; either failure raises
(:mod:`sfpo_train.verl.ranks`).

:class:`SFPOActorRolloutRefWorker` installs all of this: ``actor_worker_cls =
SFPOTrainingWorker``, SFPO's settings read from the block
``actor_rollout_ref.sfpo`` that the driver wrote
(:func:`sfpo_train.verl.config.normalize_sfpo_config`, once, in
:func:`sfpo_train.verl.main.prepare_config`), and, with ``fused_kernels``,
sfpo's log-prob forward and policy loss.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.distributed as dist
from omegaconf import DictConfig, open_dict
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from sfpo_train.sfpo import SFPO, SFPOConfig
from sfpo_train.verl import fused
from sfpo_train.verl.config import VerlSFPOSettings, normalized_settings, resolve_fused_kernels
from sfpo_train.verl.cpu_runtime import PLATFORM_ENV
from sfpo_train.verl.ranks import broadcast_from_rank0, check_ranks_agree

logger = logging.getLogger(__name__)

ENTROPY_KEY = "sfpo_entropy"  # non-tensor key of the update batch: this iteration's actor/entropy
STATE_FILE = "sfpo_state.json"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class SFPOTrainingWorker(TrainingWorker):
    """verl's ``TrainingWorker`` whose ``train_mini_batch`` is one SFPO iteration once :meth:`enable_sfpo` ran."""

    sfpo: SFPO | None = None
    _hold_lr_scheduler: bool = False

    def enable_sfpo(self, config: SFPOConfig) -> None:
        """Wrap the actor's parameters (FSDP2 ``DTensor`` shards included) in :class:`SFPO`."""
        self.sfpo = SFPO(self.engine.module, config)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_mini_batch(self, data):
        """One SFPO iteration on ``data`` (verl's update batch plus ``sfpo_entropy``); verl's metrics plus ``sfpo/*``.

        Without SFPO enabled this is verl's ``train_mini_batch`` unchanged.
        """
        entropy = tu.pop(data, key=ENTROPY_KEY, default=None)
        if self.sfpo is None:
            return super().train_mini_batch(data)
        if entropy is None and self.sfpo.config.trigger_entropy == "old_log_prob":
            raise ValueError(
                f"SFPO needs this iteration's entropy in the update batch (non-tensor key {ENTROPY_KEY!r}, "
                "verl's actor/entropy); run through sfpo_train.verl.main / SFPOTrainer, or assign it yourself"
            )
        self._check_schedule_agrees("before its iteration")
        n_passes = len(self.sfpo.planned_passes())  # the rule's plan: only its last pass steps the LR scheduler
        scheduler = getattr(self.engine, "lr_scheduler", None)
        epoch_before = getattr(scheduler, "last_epoch", None)
        outputs: list = []

        def update_pass(batch) -> dict:
            # Only the iteration's last pass may step the LR scheduler.
            self._hold_lr_scheduler = len(outputs) < n_passes - 1
            try:
                # a fresh shallow copy: train_mini_batch pops its metadata keys from its input
                outputs.append(TrainingWorker.train_mini_batch(self, batch.copy()))
            finally:
                self._hold_lr_scheduler = False
            return {"entropy": self._pass_entropy(outputs[-1])} if last_pass else {}

        last_pass = self.sfpo.config.trigger_entropy == "last_pass"
        sfpo_metrics = self.sfpo.step(update_pass, data, entropy=None if last_pass else float(entropy))
        self._check_schedule_agrees("after its iteration")
        if epoch_before is not None and scheduler.last_epoch != epoch_before + 1:
            # verl steps the scheduler in the last train_batch of a train_mini_batch call; SFPO holds it in
            # every pass but the last. A verl change to either would step it 0 or K+1 times per iteration.
            raise RuntimeError(
                f"the LR scheduler stepped {scheduler.last_epoch - epoch_before} times in one SFPO iteration "
                f"of {len(outputs)} passes; it must step exactly once (did verl's train_mini_batch change?)"
            )
        if not any(out is not None for out in outputs):
            return None  # a rank that does not report outputs (verl's is_mp_src_rank_with_outputs)
        merged: dict[str, list] = {}
        for out in outputs:
            if out is None:
                continue
            for key, value in tu.get(out, "metrics").items():
                merged.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        for key, value in sfpo_metrics.items():
            if key.startswith(("sfpo/", "timing_s/sfpo")) and not key.startswith("sfpo/last/"):
                merged[key] = [value]
        merged["sfpo/entropy"] = [sfpo_metrics["sfpo/entropy"]]  # what the trigger recorded (trigger_entropy)
        merged["sfpo/passes"] = [float(len(outputs))]
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": merged}).cpu()

    def _check_schedule_agrees(self, when: str) -> None:
        """Every rank's rule holds the same schedule (see :mod:`sfpo_train.verl.ranks`), or all raise."""
        rule = self.sfpo
        check_ranks_agree(
            f"{when} {rule.iteration}",
            iteration=rule.iteration,
            alpha=rule.alpha,
            fired_at=rule.fired_at,
            window=len(rule.entropies),
            last_zscore=rule.last_zscore,
        )

    def _pass_entropy(self, output) -> float:
        """One pass's entropy for ``trigger_entropy=last_pass``: the mean of its ``actor/entropy_loss`` values.

        verl aggregates those over the data-parallel ranks on the ranks that report outputs; the
        value is averaged over those ranks by an all-reduce, so every rank's trigger sees the same
        number (a rank without outputs contributes nothing).
        """
        values = [] if output is None else tu.get(output, "metrics").get("actor/entropy_loss", [])
        values = values if isinstance(values, list) else [values]
        mean = sum(float(v) for v in values) / len(values) if values else 0.0
        count = 1.0 if values else 0.0
        if dist.is_initialized():
            both = torch.tensor([mean * count, count], dtype=torch.float64, device=get_device_name())
            dist.all_reduce(both)
            mean, count = (float(both[0] / both[1]) if both[1] > 0 else 0.0), float(both[1])
        if count == 0:
            raise ValueError(
                "actor_rollout_ref.actor.sfpo.trigger_entropy=last_pass needs each update pass's entropy "
                "(verl's actor/entropy_loss): set actor_rollout_ref.actor.calculate_entropy=true"
            )
        return mean

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_batch(self, data):
        """verl's ``train_batch``; during SFPO's non-final passes the LR scheduler is held."""
        if self._hold_lr_scheduler:
            tu.assign_non_tensor(data, update_lr_scheduler=False)
        return super().train_batch(data)

    # ------------------------------------------------------------------ checkpoints

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        """verl's checkpoint, then SFPO's schedule state as ``<local_path>/sfpo_state.json`` (rank 0)."""
        result = super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        if self.sfpo is not None and _is_rank0():
            os.makedirs(local_path, exist_ok=True)
            state = self.sfpo.state_dict()
            tmp = os.path.join(local_path, STATE_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(state, f, allow_nan=True)  # last_zscore is NaN until the window fills
            os.replace(tmp, os.path.join(local_path, STATE_FILE))
        return result

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        """SFPO's state first (verl may delete ``local_path`` after loading), then verl's checkpoint.

        Rank 0 reads ``sfpo_state.json`` and broadcasts it: on nodes without a
        shared filesystem only rank 0's node has the file.
        """
        state = None
        path = os.path.join(local_path, STATE_FILE) if local_path else None
        if self.sfpo is not None:
            if _is_rank0() and path and os.path.exists(path):
                with open(path) as f:
                    state = json.load(f)
            state = broadcast_from_rank0(state)
        result = super().load_checkpoint(local_path, hdfs_path, del_local_after_load)
        if state is not None:
            self.sfpo.load_state_dict(state)
        elif self.sfpo is not None:
            logger.warning(
                "no %s in %s: SFPO's schedule starts fresh (resuming a GRPO checkpoint?)", STATE_FILE, local_path
            )
        return result


class SFPOActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker with :class:`SFPOTrainingWorker` as its actor."""

    actor_worker_cls = SFPOTrainingWorker

    def __init__(self, config: DictConfig, role: str, distillation_config=None, **kwargs):
        if os.environ.get(PLATFORM_ENV) == "cpu":
            from sfpo_train.verl.cpu_runtime.engine import use_cpu

            use_cpu()  # in this Ray process: the platform, the CPU engine, the gloo group (before verl's init)
        # the driver's normalised block; SFPO keys left in config.actor (which verl's ActorConfig rejects) raise
        self.sfpo_settings: VerlSFPOSettings = normalized_settings(config)
        self.fused_kernels = resolve_fused_kernels(self.sfpo_settings, get_device_name())
        if self.fused_kernels:
            apply_fused_kernel_config(config)
        super().__init__(config, role, distillation_config, **kwargs)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        for worker in (self.actor, self.ref):
            if worker is not None and self.fused_kernels:
                fused.install_logprob_forward(worker.engine.module)
                # the first forward compares the kernels with verl's eager numbers; auto falls back on a mismatch
                fused.arm_first_use_check(worker.engine.module, strict=self.sfpo_settings.fused_kernels is True)
        if self.actor is not None and self.sfpo_settings.enable:
            self.actor.enable_sfpo(self.sfpo_settings.sfpo)


def apply_fused_kernel_config(config: DictConfig) -> None:
    """Turn on verl's fused log-prob path (whose forward we then replace) and our policy loss.

    ``model.use_fused_kernels=True`` with ``impl_backend=torch`` makes verl patch a
    dense forward that returns log-probs and entropy; ``policy_loss.loss_mode`` goes
    from ``vanilla`` (GRPO's clipped loss) to ``sfpo_vanilla``. Other loss modes
    (gspo, clip-cov, ...) are left alone: sfpo has no kernel for them.
    """
    with open_dict(config):
        config.model.use_fused_kernels = True
        if config.model.get("fused_kernel_options") is None:
            config.model.fused_kernel_options = {}
        config.model.fused_kernel_options.impl_backend = "torch"
        policy_loss = config.actor.get("policy_loss")
        if policy_loss is not None and policy_loss.get("loss_mode", "vanilla") == "vanilla":
            policy_loss.loss_mode = fused.POLICY_LOSS_NAME


__all__ = ["ENTROPY_KEY", "STATE_FILE", "SFPOActorRolloutRefWorker", "SFPOTrainingWorker", "apply_fused_kernel_config"]
