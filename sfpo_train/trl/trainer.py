"""``SFPOGRPOTrainer``: TRL's ``GRPOTrainer`` with SFPO around its update passes.

TRL runs GRPO as a Hugging Face ``Trainer``: the dataloader yields one *generation
batch* (``per_device_train_batch_size * steps_per_generation`` rows) per micro-step,
``_prepare_inputs`` generates completions from it and hands out one slice per
micro-step, and every ``gradient_accumulation_steps`` micro-steps the ``Trainer``
takes an optimizer step. One *update pass* is one pass over a generation batch:
``steps_per_generation`` micro-steps, ``steps_per_generation /
gradient_accumulation_steps`` optimizer steps.

SFPO makes one iteration of one generation batch (:class:`~sfpo_train.iteration.SFPOIteration`,
the same rule :meth:`SFPO.step` runs):

- while alpha_s > 0: snapshot theta_0, K fast passes, the reposition
  ``theta <- theta_0 + alpha_s (theta - theta_0)``, one slow pass: K + 1 passes of one
  generation; every pass uses theta_0's old log-probs, as TRL's ``num_iterations = K + 1``
  does (with alpha = 1 the weights are that run's);
- once the entropy trigger has fired (alpha 0): one pass per generation, plain GRPO.

``state.global_step`` counts optimizer steps as in TRL. The dataloader keeps
producing one generation batch per pass's worth of micro-steps; the batches an
iteration does not need yet wait in order (:attr:`pending_generation_batches`),
so prompts are used in the sampler's order and none is skipped.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import (
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from sfpo_train.iteration import SFPOIteration
from sfpo_train.sfpo import SFPO, SFPOConfig

STATE_FILE = "sfpo_state.pt"
STATE_VERSION = 1


class SFPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with Slow-Fast Policy Optimization; every ``GRPOTrainer`` argument, plus:

    Args:
        sfpo: the SFPO hyperparameters (:class:`~sfpo_train.sfpo.SFPOConfig`); None: plain TRL GRPO.
        fused_head: compute TRL's loss with sfpo's fused LM head and loss
            (:func:`sfpo_kernels.linear_grpo_loss`: no ``[tokens, vocab]`` logits, entropy and its
            gradient included). Settings it cannot reproduce exactly are a ``ValueError`` here.

    With ``sfpo`` set, ``GRPOConfig.num_iterations`` must stay 1 (K replaces it) and
    ``steps_per_generation`` must be a multiple of ``gradient_accumulation_steps`` (a pass
    ends on an optimizer step, where the reposition happens).
    """

    def __init__(self, *args, sfpo: SFPOConfig | None = None, fused_head: bool = False, **kwargs):
        if sfpo is not None and not isinstance(sfpo, SFPOConfig):
            raise ValueError(f"sfpo must be an SFPOConfig or None, got {type(sfpo).__name__}")
        if not isinstance(fused_head, bool):
            raise ValueError(f"fused_head must be True or False, got {fused_head!r}")
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if grpo_args is not None:  # checked before the model loads; None: TRL's defaults, checked below
            _check_args(grpo_args, sfpo, fused_head)
        super().__init__(*args, **kwargs)
        _check_args(self.args, sfpo, fused_head)
        self.fused_head = fused_head
        if fused_head:
            from sfpo_train.trl.fused_loss import prepare_fused_loss

            prepare_fused_loss(self)  # checks the settings and the model, then lets the model return hidden states
        self.sfpo = SFPO(self.model, sfpo) if sfpo is not None else None
        self.pending_generation_batches: deque = deque()
        self._batches_seen = 0  # generation-batch copies the dataloader handed over (one per micro-step)
        self._iteration: SFPOIteration | None = None
        self._iteration_start = 0  # self._step when the running iteration began
        self._entropy_sums = _EntropySums()  # the running pass's token entropies
        self._old_entropy_sums: _EntropySums | None = None  # set while the old-log-prob forward is captured
        self._deferred: set[str] = set()  # "should_evaluate" / "should_save" asked for between passes
        if self.sfpo is not None:
            self.add_callback(_SFPOCallback(self))

    # ----------------------------------------------------------------- generation

    def _prepare_inputs(self, generation_batch):
        if self.sfpo is None or not self.model.training:
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._batches_seen % spg == 0:  # the first of the spg copies of a new generation batch
            self.pending_generation_batches.append(generation_batch)
        self._batches_seen += 1
        if self._iteration is None:
            self._begin_iteration(self.pending_generation_batches.popleft())
        return self._buffered_inputs[(self._step - self._iteration_start) % spg]

    def _begin_iteration(self, generation_batch) -> None:
        """Generate for the next SFPO iteration (theta_0's old log-probs when it makes several passes), then begin it."""
        plan = self.sfpo.planned_passes()
        spg, ga = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        # TRL's own rule for when a generation gets an old-log-prob forward (num_iterations = passes it feeds)
        old_forward = ga % (spg * len(plan)) != 0 or (self.use_vllm and self.vllm_importance_sampling_correction)
        capture = (
            old_forward and self.sfpo.config.trigger_entropy == "old_log_prob" and self.sfpo.config.entropy_control
        )
        self._old_entropy_sums = _EntropySums() if capture else None
        # TRL computes old log-probs when a generation feeds more than one optimizer step
        # (num_iterations > 1 among them): say how many passes this one feeds.
        self.num_iterations = len(plan)
        try:
            batch = self._generate_and_score_completions(generation_batch)
        finally:
            self.num_iterations = 1
            old_sums, self._old_entropy_sums = self._old_entropy_sums, None
        batch = shuffle_sequence_dict(split_pixel_values_by_grid(batch))
        self._buffered_inputs = [
            unsplit_pixel_values_by_grid(part) for part in split_tensor_dict(batch, self.args.steps_per_generation)
        ]
        entropy = old_sums.mean(self.accelerator) if old_sums is not None and old_sums.seen else None
        self._iteration = self.sfpo.begin(entropy)
        self._iteration_start = self._step
        self._entropy_sums = _EntropySums()

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        old = self._old_entropy_sums
        # the generation's first forward of the policy (before the reference's): the old log-probs at theta_0
        capture_old = old is not None and not old.seen and model is self.model
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=batch_size,
            compute_entropy=compute_entropy or capture_old,
            **kwargs,
        )
        if capture_old:
            old.add(entropies, attention_mask[:, -logits_to_keep:])
            return logps, (entropies if compute_entropy else None), aux
        if compute_entropy:
            self._record_entropy(entropies, attention_mask[:, -logits_to_keep:])
        return logps, entropies, aux

    # ----------------------------------------------------------------- the loss

    def _compute_loss(self, model, inputs):
        if not self.fused_head:
            return super()._compute_loss(model, inputs)
        from sfpo_train.trl.fused_loss import compute_fused_loss

        return compute_fused_loss(self, model, inputs, on_entropy=self._record_entropy)

    def _record_entropy(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        """Token entropies of a training forward (TRL's head and the fused head both report them here)."""
        if self._iteration is not None and torch.is_grad_enabled():
            self._entropy_sums.add(entropies, mask)

    # ----------------------------------------------------------------- passes and iterations

    def _after_optimizer_step(self, control) -> None:
        """Called after every optimizer step: close the pass that ended, then the iteration, then defer saves."""
        iteration = self._iteration
        if iteration is None:
            return
        if (self._step - self._iteration_start) % self.args.steps_per_generation == 0:
            sums, self._entropy_sums = self._entropy_sums, _EntropySums()
            try:
                iteration.pass_done({"entropy": sums.mean(self.accelerator)} if sums.seen else {})
                if iteration.next_pass is None:
                    metrics = iteration.finish()
                    self._iteration = None
                    for key, value in metrics.items():
                        if key.startswith(("sfpo/", "timing_s/sfpo_")) and not key.startswith("sfpo/last/"):
                            self._metrics["train"][key].append(float(value))
            except BaseException as failure:
                iteration.abort(failure)
                self._iteration = None
                raise
        if self._iteration is not None and control.should_training_stop:
            self._stop_mid_iteration()  # then the final save may happen, of the weights as they are
        if self._iteration is None:
            for flag in self._deferred:
                setattr(control, flag, True)
            self._deferred.clear()

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # A checkpoint holds whole iterations, and an evaluation (and vLLM, which it would sync) sees only
        # weights between iterations: what the Trainer asks for between passes (save_steps, eval_steps, an
        # epoch's end, a callback) waits for the iteration's end. Here, after every callback has spoken.
        if self._iteration is not None:
            for flag in ("should_evaluate", "should_save"):
                if getattr(self.control, flag):
                    setattr(self.control, flag, False)
                    self._deferred.add(flag)
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _stop_mid_iteration(self) -> None:
        iteration, self._iteration = self._iteration, None
        warnings.warn(
            f"SFPOGRPOTrainer: training stopped after {iteration.passes_done} of the {len(iteration.plan)} passes "
            f"of SFPO iteration {self.sfpo.iteration} (max_steps={self.args.max_steps}); the weights are the last "
            "pass's, not repositioned, and this iteration is not counted",
            stacklevel=2,
        )
        iteration.release()

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.sfpo is not None:  # a fresh train() starts the data plumbing afresh (a resume loads it)
            self.pending_generation_batches.clear()
            self._batches_seen, self._iteration, self._deferred = 0, None, set()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException as failure:  # leave theta_0 of the iteration that failed, never a half-way point
            if self._iteration is not None:
                self._iteration.abort(failure)
                self._iteration = None
            raise

    # ----------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.sfpo is None:
            return
        if self._iteration is not None:
            raise RuntimeError("SFPOGRPOTrainer: a checkpoint was saved between the passes of an SFPO iteration")
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        state = {
            "version": STATE_VERSION,
            "sfpo": self.sfpo.state_dict(),
            # each process's own slice of the batches (accelerate shards the sampler), and where in the
            # steps_per_generation copies of the current one its dataloader stands
            "pending_generation_batches": list(self.pending_generation_batches),
            "copies_seen": self._batches_seen % self.args.steps_per_generation,
        }
        torch.save(state, os.path.join(folder, _state_file(self.accelerator)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.sfpo is None or checkpoint is None:
            return
        name = _state_file(self.accelerator)
        path = os.path.join(checkpoint, name)
        if not os.path.exists(path):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has no {name}: it was not saved by SFPOGRPOTrainer "
                f"with sfpo set on {self.accelerator.num_processes} process(es), so the SFPO schedule cannot "
                "continue exactly"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable SFPO state ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: expected an SFPO state of version {STATE_VERSION}")
        pending, copies = state.get("pending_generation_batches"), state.get("copies_seen")
        if not isinstance(pending, list):
            raise ValueError(f"{path}: 'pending_generation_batches' must be a list, got {type(pending).__name__}")
        spg = self.args.steps_per_generation
        if isinstance(copies, bool) or not isinstance(copies, int) or not 0 <= copies < spg:
            raise ValueError(f"{path}: 'copies_seen' must be an integer in [0, {spg}), got {copies!r}")
        self.sfpo.load_state_dict(state["sfpo"])  # checks everything before it changes anything
        self.pending_generation_batches = deque(pending)
        self._batches_seen = copies  # a stop inside a pass leaves the dataloader within a batch's copies
        self._iteration = None


class _SFPOCallback(TrainerCallback):
    """The ``Trainer``'s events SFPO acts on: each optimizer step's end and the end of training."""

    def __init__(self, trainer: SFPOGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step(control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer._iteration is not None:
            self.trainer._stop_mid_iteration()
        return control


def _state_file(accelerator) -> str:
    """``sfpo_state.pt``; with several processes one per rank (``sfpo_state_rank<r>.pt``), each holding its slice."""
    return STATE_FILE if accelerator.num_processes == 1 else f"sfpo_state_rank{accelerator.process_index}.pt"


class _EntropySums:
    """Token-weighted entropy of the forwards of one pass (or of the old-log-prob forward), over every process."""

    def __init__(self):
        self.total = None
        self.tokens = None
        self.seen = False

    def add(self, entropies: torch.Tensor, mask: torch.Tensor) -> None:
        weights = mask.to(torch.float64)
        total = (entropies.detach().to(torch.float64) * weights).sum()
        tokens = weights.sum()
        self.total = total if self.total is None else self.total + total
        self.tokens = tokens if self.tokens is None else self.tokens + tokens
        self.seen = True

    def mean(self, accelerator) -> float:
        """The mean over every process's tokens (the same number on each rank), NaN without tokens."""
        both = accelerator.reduce(torch.stack([self.total, self.tokens]), reduction="sum")
        total, tokens = both.tolist()
        return total / tokens if tokens > 0 else math.nan


def _check_args(args, sfpo: SFPOConfig | None, fused_head: bool) -> None:
    if fused_head:
        from sfpo_train.trl.fused_loss import fused_loss_options

        fused_loss_options(args)  # a setting the fused head cannot reproduce: ValueError naming the field
    if sfpo is None:
        return
    if sfpo.inner_steps == 0 and not sfpo.slow_correction:
        raise ValueError("SFPOConfig(inner_steps=0, slow_correction=False) makes no update pass: nothing would train")
    if args.num_iterations != 1:
        raise ValueError(
            f"GRPOConfig.num_iterations={args.num_iterations}: with sfpo set it must stay 1. SFPOConfig.inner_steps "
            f"(K) reuses each generation for K fast passes and one slow pass; TRL's num_iterations={args.num_iterations}"
            f" is SFPOConfig(inner_steps={args.num_iterations - 1}, alpha=1.0) without the trigger"
        )
    spg, ga = args.steps_per_generation, args.gradient_accumulation_steps
    if spg is not None and spg % ga != 0:
        raise ValueError(
            f"GRPOConfig.steps_per_generation={spg} must be a multiple of gradient_accumulation_steps={ga} with "
            "sfpo set: an update pass (one pass over a generation batch) must end on an optimizer step"
        )
