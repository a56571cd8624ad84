"""The ``hf`` rollout server (``sfpo_train.verl.cpu_runtime.hf_rollout``), in-process, on the shipped addition model.

Oracles are independent of the server's batching and of ``generate``: one
prompt at a time, unpadded, a plain forward per step (greedy: argmax; the
log-probs: ``log_softmax`` of the temperature-scaled, top-k-filtered logits of
the forward over prompt + response). Ray's side (the replica, the adapter, the
sync through the object store) runs in ``examples/verl/cpu-smoke.sh``
(``test_cpu_smoke_outputs.py``).
"""

import asyncio

import pytest
import torch

from tests.helpers.optional import import_or_skip

import_or_skip("verl")

from omegaconf import OmegaConf
from verl.workers.config import RolloutConfig

from sfpo_train.tasks import default_paths
from sfpo_train.verl.cpu_runtime import hf_rollout
from sfpo_train.verl.cpu_runtime.hf_rollout import HFRolloutServer

# different lengths, so that a batch is left-padded (the task's own prompts are all 8 tokens)
PROMPTS = ["123+456=", "5+7=", "99+1=", "505+261="]
LOGPROB_TOL = {"atol": 1e-4, "rtol": 0}  # fp32 forward of a batch (left-padded) vs one unpadded sequence


def _server(**rollout) -> HFRolloutServer:
    config = RolloutConfig(
        name="hf",
        prompt_length=8,
        response_length=5,
        dtype="float32",
        max_num_seqs=64,
        tensor_model_parallel_size=1,
        **rollout,
    )
    model = {"path": default_paths()["model"], "override_config": {"attn_implementation": "eager"}}  # as on CPU
    return HFRolloutServer(config, OmegaConf.create(model), replica_rank=0)


@pytest.fixture(scope="module")
def server():
    return _server()


def _ids(server, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_paths()["model"]).encode(text, add_special_tokens=False)


def _generate_all(server, prompts: list[list[int]], params: list[dict]):
    async def go():
        return await asyncio.gather(
            *[
                server.generate(p, dict(s), request_id=str(i))
                for i, (p, s) in enumerate(zip(prompts, params, strict=True))
            ]
        )

    return asyncio.run(go())


def _oracle_greedy(model, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt) :]


def _oracle_logprobs(
    model, prompt: list[int], tokens: list[int], temperature: float, top_k: int = -1, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k (the k largest), then top-p (a token stays while the mass above it is < p)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].double() / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_above = probs.cumsum(dim=-1) - probs
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_greedy_requests_arriving_together_match_one_at_a_time(server, monkeypatch):
    calls = []
    generate = server.model.generate
    monkeypatch.setattr(server.model, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw))
    prompts = [_ids(server, p) for p in PROMPTS]
    outs = _generate_all(server, prompts, [{"temperature": 0, "top_p": 1.0, "top_k": -1}] * len(prompts))
    assert calls == [torch.Size([4, 8])]  # one batch, padded to the longest prompt
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _oracle_greedy(server.model, prompt, 5, server.eos_ids)
        assert out.log_probs is None and out.stop_reason == "completed"


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, -1, 1.0), (0.7, 3, 1.0), (1.3, -1, 0.8), (1.0, 4, 0.9)]
)
def test_sampled_log_probs_are_the_processed_distributions(server, temperature, top_k, top_p):
    torch.manual_seed(0)
    prompts = [_ids(server, p) for p in PROMPTS] * 2
    params = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "logprobs": True}
    outs = _generate_all(server, prompts, [params] * len(prompts))
    for prompt, out in zip(prompts, outs, strict=True):
        assert 1 <= len(out.token_ids) <= 5 and len(out.log_probs) == len(out.token_ids)
        want = _oracle_logprobs(server.model, prompt, out.token_ids, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(out.log_probs, dtype=torch.float64), want, **LOGPROB_TOL)


def test_mixed_sampling_settings_are_served_in_separate_batches(server):
    prompts = [_ids(server, p) for p in PROMPTS]
    greedy = {"temperature": 0, "top_k": -1}
    outs = _generate_all(
        server,
        prompts,
        [
            greedy,
            {"temperature": 1.0, "max_tokens": 2, "logprobs": True},
            greedy,
            {"temperature": 1.0, "ignore_eos": True, "logprobs": True},
        ],
    )
    for i in (0, 2):
        assert outs[i].token_ids == _oracle_greedy(server.model, prompts[i], 5, server.eos_ids)
    assert 1 <= len(outs[1].token_ids) <= 2 and len(outs[1].log_probs) == len(outs[1].token_ids)
    # ignore_eos: the whole budget, from the unchanged distribution (EOS keeps its probability)
    assert len(outs[3].token_ids) == 5
    want = _oracle_logprobs(server.model, prompts[3], outs[3].token_ids, 1.0)
    torch.testing.assert_close(torch.tensor(outs[3].log_probs, dtype=torch.float64), want, **LOGPROB_TOL)


def test_weight_sync_loads_every_tensor_and_rejects_a_mismatch():
    server = _server()
    reference = _server()
    torch.manual_seed(1)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one tensor under two names
    reference.model.load_state_dict(state)
    names = sorted(state)
    half = len(names) // 2
    dropped = next(n for n in names if not n.endswith("lm_head.weight"))  # a tied head may be left out

    async def sync(named_parts):
        for i, part in enumerate(named_parts):
            loaded = await server.load_weights(part, i == len(named_parts) - 1)
        return loaded

    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    bad_shape = {**state, dropped: state[dropped][..., :1]}
    with pytest.raises(ValueError, match="other shapes"):
        asyncio.run(sync([bad_shape]))
    with pytest.raises(ValueError, match="missing"):
        asyncio.run(sync([{k: state[k] for k in names if k != dropped}]))
    with pytest.raises(ValueError, match="unknown"):
        asyncio.run(sync([{**state, "not.a.weight": torch.zeros(1)}]))
    for name, value in server.model.state_dict().items():  # nothing half-applied
        assert torch.equal(value, before[name]), name

    assert asyncio.run(sync([{k: state[k] for k in names[:half]}, {k: state[k] for k in names[half:]}])) == len(names)
    prompts = [_ids(server, p) for p in PROMPTS]
    outs = _generate_all(server, prompts, [{"temperature": 0}] * len(prompts))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _oracle_greedy(reference.model, prompt, 5, reference.eos_ids)


def test_requests_it_cannot_serve_are_errors(server):
    prompt = _ids(server, PROMPTS[0])
    with pytest.raises(ValueError, match="does not support sampling parameters"):
        _generate_all(server, [prompt], [{"temperature": 1.0, "min_p": 0.1}])
    with pytest.raises(ValueError, match="text-only"):
        asyncio.run(server.generate(prompt, {}, request_id="x", image_data=[object()]))
    with pytest.raises(ValueError, match="temperature"):
        _generate_all(server, [prompt], [{"temperature": -1.0}])
    with pytest.raises(ValueError, match="no room"):
        asyncio.run(server.generate(list(range(2, 12)) * 2, {}, request_id="x"))


@pytest.mark.parametrize("key", ["tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"])
def test_parallel_rollouts_are_rejected_by_name(key):
    with pytest.raises(ValueError, match=f"rollout.{key}=1 \\(got 2\\)"):
        hf_rollout.check_rollout_config(OmegaConf.create({key: 2}))


def test_left_pad_puts_the_padding_and_the_mask_zeros_on_the_left():
    ids, mask = hf_rollout.left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and mask.dtype == torch.long
