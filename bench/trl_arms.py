"""The arms of ``bench/test_bench_trl.py``: TRL's trainers and ``sfpo train``'s, one iteration at a time, interleaved.

Every arm trains the shipped addition model on the embedded task with the same batch (``prompts`` x
``n`` responses of at most ``response_length`` tokens, the first prompts of the training set in order,
one optimizer step per update pass) and the same optimizer settings (AdamW, lr 3e-5, weight decay
0.01, gradient clipping at 1.0, constant rate), on the CPU:

- ``trl_grpo``: ``trl.GRPOTrainer`` (its own loss, ``loss_type="bnpo"``: verl's token-mean), with TRL's
  defaults otherwise: activation checkpointing on (``GRPOConfig`` turns it on; ``sfpo train`` has none);
- ``trl_grpo_no_ckpt``: the same with ``activation_checkpointing=False``, like for like with ``sfpo train``;
- ``trl_mu4``: the same with ``num_iterations=K+1``: SFPO's passes without SFPO (alpha = 1 without
  the snapshot, the reposition and the trigger), so ``trl_sfpo`` minus ``trl_mu4`` is SFPO's own work;
- ``trl_sfpo``: ``SFPOGRPOTrainer(sfpo=SFPOConfig(inner_steps=3, alpha=0.8))``, the entropy
  trigger on (old-log-prob entropy) with a threshold it cannot reach, so every iteration runs K + 1 passes;
- ``trl_grpo_fused`` / ``trl_sfpo_fused``: the same with ``fused_head=True`` (sfpo's fused LM head as
  TRL's loss);
- ``sfpo_train_grpo`` / ``sfpo_train_sfpo``: ``sfpo train``'s trainer (``Trainer.train_step()``) on
  the ``default`` preset's settings with the same batch.

One iteration: one generation batch, generated, scored and trained on (GRPO: one pass; SFPO and
``trl_mu4``: four). TRL's ``Trainer.train()`` owns its loop, so a TRL arm runs ``train()`` in a thread
of its own that hands control back at the optimizer step that ends an iteration (a callback); one
thread runs at a time, so the process's CPU time (``time.process_time``) from a hand-over to the
hand-back is that arm's iteration, the ``Trainer``'s own per-step work (logging, scheduler,
callbacks) included. Every arm uses one gradient-accumulation step, so accelerate's state, which
all ``Accelerator`` objects of a process share, reads the same for all of them.

SFPO's own work in a TRL iteration (``sfpo_own_cpu_s``) is the CPU time inside the parts of
``SFPOGRPOTrainer`` that plain TRL does not run: ``SFPO.begin`` (the snapshot), the end-of-pass hook
(the reposition after the last fast pass, the trigger update, the entropy reduction, the metrics)
and the entropy sums of every forward.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCALE_ENV = "SFPO_BENCH_TRL"  # "small" (default: CI-sized) or "full" (the embedded default's batch; N=4096, V=32768)
SFPO_K, SFPO_ALPHA = 3, 0.8
UNREACHABLE_ZSCORE = 1e6  # the trigger runs its bookkeeping but never fires: every iteration is K + 1 passes


@dataclass(frozen=True)
class TRLBenchShape:
    """What one scale of the benchmark runs."""

    prompts: int
    n: int
    response_length: int
    rounds: int
    warmup: int
    loss_rows: int  # the loss rows: rows x completion tokens = N
    loss_completion: int
    loss_vocab: int
    loss_rounds: int

    @property
    def loss_tokens(self) -> int:
        return self.loss_rows * self.loss_completion


SCALES = {
    "small": TRLBenchShape(
        4, 4, 5, rounds=3, warmup=1, loss_rows=4, loss_completion=128, loss_vocab=4096, loss_rounds=3
    ),
    # the embedded default's batch (16 prompts x 8 responses of <= 5 tokens); the loss where the logits dominate
    "full": TRLBenchShape(
        16, 8, 5, rounds=15, warmup=2, loss_rows=16, loss_completion=256, loss_vocab=32768, loss_rounds=5
    ),
}


def bench_scale() -> tuple[str, TRLBenchShape]:
    name = os.environ.get(SCALE_ENV) or "small"
    if name not in SCALES:
        raise ValueError(f"{SCALE_ENV}={name!r}; expected one of {', '.join(SCALES)}")
    return name, SCALES[name]


@dataclass(frozen=True)
class ArmSpec:
    """One arm: which trainer, which update rule, which LM head / loss."""

    trainer: str  # "trl" or "sfpo train"
    method: str  # "grpo", "sfpo", or "grpo_mu4" (TRL's num_iterations = K + 1)
    head: str  # "trl" (TRL's loss), "sfpo_fused" (sfpo's fused head in TRL), "logits" (sfpo train's default on the CPU)
    checkpointing: bool = True  # TRL's activation checkpointing (GRPOConfig's default: on); sfpo train has none


ARMS = {
    "trl_grpo": ArmSpec("trl", "grpo", "trl"),
    "trl_grpo_no_ckpt": ArmSpec("trl", "grpo", "trl", checkpointing=False),
    "trl_grpo_fused": ArmSpec("trl", "grpo", "sfpo_fused"),
    "trl_mu4": ArmSpec("trl", "grpo_mu4", "trl"),
    "trl_sfpo": ArmSpec("trl", "sfpo", "trl"),
    "trl_sfpo_fused": ArmSpec("trl", "sfpo", "sfpo_fused"),
    "sfpo_train_grpo": ArmSpec("sfpo train", "grpo", "logits", checkpointing=False),
    "sfpo_train_sfpo": ArmSpec("sfpo train", "sfpo", "logits", checkpointing=False),
}


def fused_head_missing() -> str | None:
    """Why ``SFPOGRPOTrainer(fused_head=True)`` cannot run here, or None."""
    try:
        import sfpo_train.trl.fused_loss  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "sfpo_train.trl.fused_loss":
            return "sfpo's fused loss for TRL (sfpo_train.trl.fused_loss) is not in this checkout"
        raise
    return None


# --------------------------------------------------------------------------- building the trainers


def sfpo_config():
    from sfpo_train.sfpo_config import SFPOConfig

    return SFPOConfig(inner_steps=SFPO_K, alpha=SFPO_ALPHA, zscore_threshold=UNREACHABLE_ZSCORE)


def grpo_config(output_dir: str, shape: TRLBenchShape, *, num_iterations: int = 1, **overrides):
    """TRL's settings matching ``sfpo train``'s ``default`` preset on ``shape``'s batch (one optimizer step a pass)."""
    from trl import GRPOConfig

    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=shape.prompts * shape.n,
        num_generations=shape.n,
        max_completion_length=shape.response_length,
        gradient_accumulation_steps=1,
        num_iterations=num_iterations,
        learning_rate=3e-5,
        weight_decay=0.01,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        loss_type="bnpo",  # verl's token-mean, sfpo train's default aggregation
        epsilon=0.2,
        beta=0.0,
        temperature=1.0,
        shuffle_dataset=False,  # the first prompts in order, as sfpo train with data.shuffle=false
        max_steps=1_000_000,  # the benchmark stops training at an iteration's end
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def trl_trainer(spec: ArmSpec, output_dir: str, shape: TRLBenchShape, rows: int):
    """The TRL trainer of ``spec`` on the shipped model and the first ``rows`` training problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from sfpo_train.trl import SFPOGRPOTrainer
    from sfpo_train.trl.task import addition_dataset, addition_reward, model_path

    mu = SFPO_K + 1 if spec.method == "grpo_mu4" else 1
    common = dict(
        model=AutoModelForCausalLM.from_pretrained(model_path()),
        reward_funcs=addition_reward,
        args=grpo_config(output_dir, shape, num_iterations=mu, activation_checkpointing=spec.checkpointing),
        train_dataset=addition_dataset(limit=rows),
        processing_class=AutoTokenizer.from_pretrained(model_path()),
    )
    if spec.head == "trl" and spec.method != "sfpo":
        trainer = GRPOTrainer(**common)
    else:
        sfpo = sfpo_config() if spec.method == "sfpo" else None
        trainer = SFPOGRPOTrainer(**common, sfpo=sfpo, fused_head=spec.head == "sfpo_fused")
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log line; not part of the step
    return trainer


def standalone_trainer(spec: ArmSpec, root: str, name: str, shape: TRLBenchShape):
    """``sfpo train``'s trainer on the ``default`` preset with ``shape``'s batch, prompts in order."""
    import sfpo_train.trainer.config as config_lib
    from sfpo_train.trainer import Trainer

    batch = shape.prompts * shape.n
    cfg = config_lib.load_config(
        "default",
        [
            f"trainer.default_local_dir={root}",
            f"trainer.experiment_name={name}",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.val_before_train=false",
            "trainer.save_freq=-1",
            "trainer.test_freq=-1",
            "data.shuffle=false",
            f"data.train_batch_size={shape.prompts}",
            f"data.max_response_length={shape.response_length}",
            f"actor_rollout_ref.rollout.n={shape.n}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={shape.prompts}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch}",
            f"actor_rollout_ref.actor.sfpo.enable={spec.method == 'sfpo'}",
            f"actor_rollout_ref.actor.sfpo.inner_steps={SFPO_K}",
            f"actor_rollout_ref.actor.sfpo.alpha={SFPO_ALPHA}",
            f"actor_rollout_ref.actor.sfpo.zscore_threshold={UNREACHABLE_ZSCORE}",
        ],
    )
    return Trainer.create(cfg, preset="default")


# --------------------------------------------------------------------------- stepping a TRL trainer


class _CPUTally:
    """CPU seconds spent inside wrapped callables, per thread (each TRL arm trains in a thread of its own)."""

    def __init__(self):
        self.seconds: dict[int, float] = {}
        self._depth: dict[int, int] = {}

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            me = threading.get_ident()
            depth = self._depth.get(me, 0)
            self._depth[me] = depth + 1
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[me] = depth
                if depth == 0:  # nested wrapped calls are counted once, by the outermost
                    self.seconds[me] = self.seconds.get(me, 0.0) + time.process_time() - start

        return timed

    def take(self, thread: int) -> float:
        return self.seconds.pop(thread, 0.0)


TALLY = _CPUTally()
_ENTROPY_SUMS_PATCHED = False


def _count_entropy_sums() -> None:
    """The per-forward entropy sums of every ``SFPOGRPOTrainer`` in this process count as SFPO's work."""
    global _ENTROPY_SUMS_PATCHED
    if not _ENTROPY_SUMS_PATCHED:
        from sfpo_train.trl import trainer as trl_module

        trl_module._EntropySums.add = TALLY.wrap(trl_module._EntropySums.add)
        _ENTROPY_SUMS_PATCHED = True


class ArmFailed(RuntimeError):
    """An arm raised while being built or stepped; the others carry on."""


class TRLArm:
    """A TRL trainer whose ``train()`` runs in its own thread and stops after every iteration until :meth:`step`."""

    def __init__(self, name: str, trainer):
        from transformers import TrainerCallback

        self.name, self.trainer = name, trainer
        self.error: BaseException | None = None
        self._to_arm, self._to_controller = threading.Semaphore(0), threading.Semaphore(0)
        self._stopping = False
        self._finished = False
        self._thread = threading.Thread(target=self._train, name=f"bench-{name}", daemon=True)
        self._ident: int | None = None
        self._sfpo = getattr(trainer, "sfpo", None) is not None
        if self._sfpo:
            _count_entropy_sums()
            trainer.sfpo.begin = TALLY.wrap(trainer.sfpo.begin)
            trainer._after_optimizer_step = TALLY.wrap(trainer._after_optimizer_step)
        arm = self

        class _HandBack(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                arm._hand_back(control)

            def on_step_end(self, args, state, control, **kwargs):
                if arm._iteration_ended():
                    arm._hand_back(control)

        trainer.add_callback(_HandBack())  # after SFPO's own callback: its end-of-pass work is done by then

    def _iteration_ended(self) -> bool:
        t = self.trainer
        if self._sfpo:
            return t._iteration is None
        return t._step % (t.args.steps_per_generation * t.num_iterations) == 0

    def _train(self) -> None:
        self._ident = threading.get_ident()
        torch.set_num_threads(self._threads)  # a new thread does not inherit the caller's setting under OpenMP
        self._to_arm.acquire()
        try:
            self.trainer.train()
        except BaseException as e:  # handed to the controller, which raises it
            self.error = e
        finally:
            self._finished = True
            self._to_controller.release()

    def _hand_back(self, control) -> None:
        self._to_controller.release()
        self._to_arm.acquire()
        if self._stopping:
            control.should_training_stop = True

    def _run_until_hand_back(self) -> None:
        if self._finished:
            raise ArmFailed(f"{self.name}: train() has ended") from self.error
        self._to_arm.release()
        self._to_controller.acquire()
        if self.error is not None:
            raise ArmFailed(f"{self.name}: {type(self.error).__name__}: {self.error}") from self.error
        if self._finished:
            raise ArmFailed(f"{self.name}: train() ended before the iteration did")

    def start(self) -> None:
        """Start ``train()`` and let it set up (dataloader, optimizer) up to its first step: not measured."""
        self._threads = torch.get_num_threads()
        self._thread.start()
        self._run_until_hand_back()
        TALLY.take(self._ident)

    def step(self) -> dict:
        """Run one iteration; its CPU seconds and what SFPO logged for it."""
        start = time.process_time()
        self._run_until_hand_back()
        out = {"cpu_s": time.process_time() - start}
        if self._sfpo:
            out["sfpo_own_cpu_s"] = TALLY.take(self._ident)
            logged = self.trainer._metrics["train"]
            for key in ("timing_s/sfpo_snapshot", "timing_s/sfpo_reposition", "sfpo/inner_steps_run", "sfpo/alpha"):
                out[key] = logged[key][-1]
        return out

    def close(self) -> None:
        """Let ``train()`` end at this iteration's end (untimed)."""
        if self._thread.is_alive() and not self._finished:
            self._stopping = True
            self._to_arm.release()
            self._thread.join(timeout=600)


class StandaloneArm:
    """``sfpo train``'s trainer: one ``train_step()`` per iteration, in the calling thread."""

    STAGES = ("gen", "reward", "old_log_prob", "adv", "update_actor", "sfpo_snapshot", "sfpo_reposition", "optimizer")

    def __init__(self, name: str, trainer):
        self.name, self.trainer = name, trainer
        self.error = None

    def start(self) -> None:
        pass

    def step(self) -> dict:
        start = time.process_time()
        metrics = self.trainer.train_step()
        out = {"cpu_s": time.process_time() - start}
        out.update({f"timing_s/{s}": metrics.get(f"timing_s/{s}", 0.0) for s in self.STAGES})
        out["sfpo/inner_steps_run"] = metrics["sfpo/inner_steps_run"]
        return out

    def close(self) -> None:
        pass


def build_arm(name: str, root: str, shape: TRLBenchShape):
    spec = ARMS[name]
    if spec.trainer == "sfpo train":
        return StandaloneArm(name, standalone_trainer(spec, root, name, shape))
    # enough problems for every iteration the run can take, in order
    rows = shape.prompts * (shape.rounds + shape.warmup + 2) * (SFPO_K + 1)
    return TRLArm(name, trl_trainer(spec, os.path.join(root, name), shape, rows))


def run_interleaved(arms: dict, rounds: int, warmup: int) -> dict[str, list[dict] | BaseException]:
    """``warmup`` + ``rounds`` rounds, each one iteration of every arm, the order rotated by one every round.

    Returns each arm's measured rounds (:meth:`TRLArm.step`'s dicts), or the error that stopped it;
    an arm that fails leaves the rotation and the others go on.
    """
    results: dict[str, list[dict] | BaseException] = {name: [] for name in arms}
    live = list(arms)
    for name in list(live):
        try:
            arms[name].start()
        except Exception as e:
            results[name] = e
            live.remove(name)
    for r in range(warmup + rounds):
        k = r % len(live) if live else 0
        for name in live[k:] + live[:k]:
            try:
                info = arms[name].step()
            except Exception as e:
                results[name] = e
                continue
            if r >= warmup:
                results[name].append(info)
        live = [name for name in live if not isinstance(results[name], BaseException)]
    return results


def median_min_max(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)
