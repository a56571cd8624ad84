"""Rollouts and rewards for one iteration: generate, score, and (DAPO) keep only groups that can teach.

:class:`RolloutCollector` asks the rollout engine for ``rollout.n`` responses per
prompt, scores every decoded response with verl's ``compute_score(data_source,
solution_str, ground_truth, extra_info)`` and, with
``algorithm.filter_groups.enable`` (DAPO's dynamic sampling), drops groups whose
rewards are all equal and samples more prompts until the batch is full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sfpo_train.padding import left_pad
from sfpo_train.trainer.batch import TrainBatch
from sfpo_train.trainer.data import Prompt, PromptSampler
from sfpo_train.trainer.profiler import StageProfiler
from sfpo_train.trainer.reward import score_one
from sfpo_train.trainer.rollout import RolloutBatch, SamplingSettings
from sfpo_train.trainer.settings import CollectSettings


class RolloutCollector:
    """Generation, reward and dynamic sampling over ``prompts``, in the order ``sampler`` gives."""

    def __init__(
        self,
        settings: CollectSettings,
        *,
        rollout,
        tokenizer,
        reward_fn: Callable,
        prompts: Sequence[Prompt],
        sampler: PromptSampler,
        profiler: StageProfiler,
        device: torch.device,
    ):
        self.settings, self.rollout, self.tokenizer, self.reward_fn = settings, rollout, tokenizer, reward_fn
        self.prompts, self.sampler, self.profiler, self.device = prompts, sampler, profiler, device

    def sampling(self, validation: bool) -> SamplingSettings:
        """Training's sampling settings (``rollout.*``), or validation's (``rollout.val_kwargs.*``)."""
        return self.settings.val_sampling if validation else self.settings.train_sampling

    def score(self, prompts: Sequence[Prompt], batch: RolloutBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, acc)`` per response; ``acc`` is a reward dict's ``"acc"`` entry, else the score."""
        texts = self.tokenizer.batch_decode(
            [row[mask.bool()].tolist() for row, mask in zip(batch.responses.cpu(), batch.response_mask.cpu())],
            skip_special_tokens=True,
        )
        scores, accs = [], []
        for i, text in enumerate(texts):
            p = prompts[i // n]
            score, extra = score_one(self.reward_fn, i, p.data_source, p.text, text, p.ground_truth, p.extra_info)
            scores.append(score)
            accs.append(extra.get("acc", score))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return as_tensor(scores), as_tensor(accs)

    def collect(self) -> tuple[TrainBatch, dict, int]:
        """``(batch, metrics, responses generated)``: one iteration's scored rollouts (profiled as gen / reward).

        With dynamic sampling, only groups with differing rewards are kept and
        generation repeats until ``data.train_batch_size`` groups are kept, or
        fails after ``filter_groups.max_num_gen_batches`` generation batches.
        """
        settings, n, want = self.sampling(False), self.settings.n, self.settings.train_batch_size
        kept: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per group
        num_gen_batches = generated = 0
        while True:
            num_gen_batches += 1
            prompts = [self.prompts[i] for i in self.sampler.next_batch()]
            with self.profiler.stage("gen"):
                rollout = self.rollout.generate([p.input_ids for p in prompts], settings)
            generated += len(prompts) * n
            with self.profiler.stage("reward"):
                scores, accs = self.score(prompts, rollout, n)
            groups = (accs if self.settings.filter_metric == "acc" else scores).view(-1, n)
            keep = (
                (groups.amax(1) != groups.amin(1))
                if self.settings.filter_groups
                else torch.ones(len(prompts), dtype=torch.bool)
            )
            for g in keep.nonzero().flatten().tolist():
                rows = slice(g * n, (g + 1) * n)
                kept.append((prompts[g].input_ids, rollout.responses[rows], rollout.response_mask[rows], scores[rows]))
            if len(kept) >= want:
                break
            limit = self.settings.max_num_gen_batches
            if limit > 0 and num_gen_batches >= limit:
                raise RuntimeError(
                    f"dynamic sampling kept {len(kept)} of the {want} groups it needs after {num_gen_batches} generation "
                    f"batches (algorithm.filter_groups.max_num_gen_batches={limit}): nearly every group's rewards are "
                    "all equal, so the data is too easy or too hard for the model; raise the limit (0: none) or "
                    "turn filter_groups off"
                )
        kept = kept[:want]
        prompt_ids, prompt_mask = left_pad(
            [ids for ids, *_ in kept for _ in range(n)], self.tokenizer.pad_token_id, self.device
        )
        batch = TrainBatch(
            prompt_ids,
            prompt_mask,
            torch.cat([k[1] for k in kept]),
            torch.cat([k[2] for k in kept]),
            torch.cat([k[3] for k in kept]),
        )
        return batch, {"train/num_gen_batches": float(num_gen_batches)}, generated
