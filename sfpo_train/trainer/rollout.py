"""Rollout engines: responses for a batch of tokenised prompts.

- :class:`HFRollout` (``actor_rollout_ref.rollout.name=hf``, the default):
  transformers ``generate`` on the training model itself, CPU or GPU.
- :class:`~sfpo_train.trainer.vllm_rollout.VLLMRollout` (``rollout.name=vllm``,
  optional extra, CPU or GPU): a vLLM engine holding its own copy of the
  weights, synced from the training model after every update (``sync_weights``).

Both return a :class:`RolloutBatch` with the prompt's ``n`` responses next to
each other (verl's ``repeat(interleave=True)``), responses right-padded to
``max_new_tokens`` and masked after the first EOS (which itself counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfpo_train.padding import left_pad


@dataclass(frozen=True)
class SamplingSettings:
    n: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int  # <= 0: off
    max_new_tokens: int


@dataclass
class RolloutBatch:
    """``B*n`` sequences: ``prompt_ids``/``prompt_mask`` ``[B*n, P]`` (left padded), ``responses``/``response_mask`` ``[B*n, R]``."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor


def response_mask_from(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on every token up to and including the first EOS (all tokens when there is none)."""
    is_eos = responses == eos_token_id
    before_or_at_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
    return before_or_at_first_eos.long()


def _repeated_prompts(prompts: list[list[int]], n: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt ``n`` times in a row, left-padded: ``[B*n, P]`` ids and mask."""
    return left_pad([p for p in prompts for _ in range(n)], pad_id, device)


def _finish(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: list[list[int]] | torch.Tensor,
    settings: SamplingSettings,
    pad_id: int,
    eos_id: int,
) -> RolloutBatch:
    """Responses right-padded to ``max_new_tokens``, masked after the first EOS, pad written there."""
    out = torch.full((prompt_ids.shape[0], settings.max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    if isinstance(responses, torch.Tensor):
        width = min(responses.shape[1], settings.max_new_tokens)
        out[:, :width] = responses[:, :width]
    else:
        for i, r in enumerate(responses):
            r = list(r)[: settings.max_new_tokens]
            if r:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = response_mask_from(out, eos_id)
    out = torch.where(mask.bool(), out, torch.full_like(out, pad_id))
    return RolloutBatch(prompt_ids, prompt_mask, out, mask)


class HFRollout:
    """transformers ``generate`` with the training model (sampling uses torch's global RNG)."""

    name = "hf"

    def __init__(self, model, tokenizer, autocast):
        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast

    def sync_weights(self, model) -> None:  # generates with the training model: nothing to copy
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> RolloutBatch:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids, mask = _repeated_prompts(prompts, settings.n, pad_id, device)
        sampling = (
            dict(
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else 0,
            )
            if settings.do_sample
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=0,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=self.tokenizer.bos_token_id,
            **sampling,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            self.model.train(was_training)
        return _finish(ids, mask, out[:, ids.shape[1] :], settings, pad_id, eos_id)
