"""``actor_rollout_ref.rollout.name=hf``: a transformers rollout server for verl 0.9.1's v1 trainer.

verl's v1 path gets its rollouts from a *replica* (``RolloutReplicaRegistry``)
that launches token-in/token-out server actors, plus a *server adapter*
(``BaseRollout``, in every actor worker) that syncs the trained weights into
them. verl ships vLLM, SGLang and TensorRT-LLM; none installs beside verl
0.9.1 on a CPU-only host. This module is the same contract on plain
transformers, for CPU runs and GPU hosts without an inference engine:

- :class:`HFRolloutServer` (a Ray actor, one per replica): the model from
  ``actor_rollout_ref.model.path`` in ``rollout.dtype``; ``generate(prompt_ids,
  sampling_params, request_id)`` returns verl's ``TokenOutput``. Requests that
  arrive together are batched (left-padded, one ``generate`` per group of equal
  sampling settings, at most ``rollout.max_num_seqs`` rows). Log-probs, when
  asked for, are ``log_softmax`` of the *processed* logits (temperature, top-k,
  top-p applied), verl's default ``logprobs_mode=processed_logprobs``.
- :class:`HFReplica`: verl's replica for the hybrid mode (the v1 sync trainer):
  one server per replica, placed on its worker's node and shown that worker's
  accelerator.
- :class:`HFServerAdapter`: the actor worker's side; ``update_weights`` streams
  verl's ``(name, tensor)`` pairs (full tensors: FSDP gathers each one across the
  ranks) to the rank's own server, in buckets of
  ``checkpoint_engine.update_weights_bucket_megabytes``, through Ray's object
  store. The server checks that the names and shapes cover its model exactly
  before it changes a weight.

:func:`register` puts both in verl's registries
(:func:`sfpo_train.verl.verl_internals.register_rollout`); it runs when this module is
imported, which a run asks for with ``rollout.name=hf`` (the driver names this module in
``VERL_USE_EXTERNAL_MODULES``, :mod:`sfpo_train.verl.cpu_runtime.mode`). Weight sync through the object store copies
each tensor to host memory: fine for small models and CPU runs, slow for a
multi-billion-parameter model (use vLLM there). Dense text models only: verl
renames the weights of mixture-of-experts and vision-language checkpoints for
vLLM on the way out (a sync to this server then raises, naming the tensors),
and LoRA must be merged (``model.lora.merge=true``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from verl.plugin.platform import get_platform
from verl.utils.device import get_device_name, get_resource_name, get_visible_devices_keyword
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from sfpo_train.padding import left_pad
from sfpo_train.verl import verl_internals

NAME = "hf"
SERVER_PREFIX = "hf_server_"


def register() -> None:
    """Register ``rollout.name=hf`` with verl: the replica and the ``("hf", "async")`` server adapter."""
    verl_internals.register_rollout(NAME, lambda: HFReplica, f"{__name__}.HFServerAdapter")


def server_name(replica_rank: int) -> str:
    """The Ray actor name of a replica's server (one server per replica: one node, one rank)."""
    return f"{SERVER_PREFIX}{replica_rank}"


def check_rollout_config(rollout) -> None:
    """``ValueError`` for settings the transformers server cannot honour (it holds one full model copy)."""
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        value = rollout.get(key, 1)
        if value != 1:
            raise ValueError(
                f"actor_rollout_ref.rollout.name=hf runs one full model per server: set "
                f"actor_rollout_ref.rollout.{key}=1 (got {value})"
            )


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings, hashable so that equal requests share a batch."""

    temperature: float
    top_p: float
    top_k: int  # <= 0: off
    repetition_penalty: float
    max_tokens: int
    logprobs: bool
    ignore_eos: bool

    @classmethod
    def from_request(cls, params: dict, max_tokens: int, ignore_eos: bool) -> Sampling:
        # the token budget (max_tokens / max_new_tokens) arrives as max_tokens, taken out of params by generate()
        known = {"temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "ignore_eos"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"the hf rollout server does not support sampling parameters {unknown}")
        temperature = float(params.get("temperature", 1.0))
        if temperature < 0:
            raise ValueError(f"sampling parameter temperature must be >= 0, got {temperature}")
        return cls(
            temperature=temperature,
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1) or -1),
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            max_tokens=max_tokens,
            logprobs=bool(params.get("logprobs", False)),
            ignore_eos=bool(params.get("ignore_eos", ignore_eos)),
        )

    def generate_kwargs(self, recorder: LogitsProcessor | None) -> dict:
        """``generate`` keywords: the warpers in vLLM's order (after penalties: temperature, top-k, top-p), then ``recorder``.

        The warpers are passed as our own processors, with ``generate``'s turned off,
        because ``generate`` runs a caller's processors *before* its own warpers and
        ``recorder`` must see the final, processed scores.
        """
        greedy = self.temperature == 0
        kwargs = {
            "do_sample": not greedy,
            "max_new_tokens": self.max_tokens,
            "repetition_penalty": self.repetition_penalty,
        }
        processors = []
        if not greedy:
            kwargs.update(temperature=1.0, top_k=None, top_p=1.0)
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                processors.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=self.top_p))
        if recorder is not None:
            processors.append(recorder)
        kwargs["logits_processor"] = LogitsProcessorList(processors)
        return kwargs


class ProcessedLogProbs(LogitsProcessor):
    """The log-prob of each chosen token under the processed distribution, keeping one step of scores at a time.

    Called last in every step with that step's final scores ``[rows, V]``; the
    token chosen from them shows up as the last input id of the next call (or of
    the finished sequences), so memory is one ``[rows, V]`` step, not ``[rows,
    steps, V]``.
    """

    def __init__(self):
        self._last: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self._last is not None:
            self._steps.append(self._last.gather(-1, tokens[:, None]).squeeze(-1).cpu())

    def result(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[rows, steps]`` log-probs of the generated tokens of ``sequences`` (``generate``'s output)."""
        self._take(sequences[:, -1])
        self._last = None
        return torch.stack(self._steps, dim=1)


def generate_batch(model, prompts: list[list[int]], sampling: Sampling, pad_id: int, eos_ids: set[int]):
    """``[(tokens, log_probs | None)]`` for ``prompts`` under ``sampling``: left-padded ``generate``, cut after EOS.

    ``log_probs[t] = log_softmax(processed_logits_t)[token_t]``, the processed
    logits being what ``generate`` samples from (:class:`ProcessedLogProbs`).
    ``ignore_eos`` keeps generating past EOS without changing the distribution.
    """
    ids, mask = left_pad(prompts, pad_id, next(model.parameters()).device)
    width = ids.shape[1]
    recorder = ProcessedLogProbs() if sampling.logprobs else None
    stop = None if sampling.ignore_eos else sorted(eos_ids)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pad_token_id=pad_id,
            eos_token_id=stop,
            return_dict_in_generate=True,
            **sampling.generate_kwargs(recorder),
        )
    new = out.sequences[:, width:].cpu()
    logprobs = None if recorder is None else recorder.result(out.sequences)
    results = []
    for row in range(len(prompts)):
        tokens = new[row].tolist()
        end = len(tokens)
        if not sampling.ignore_eos:
            end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), end)
        results.append((tokens[:end], None if logprobs is None else logprobs[row, :end].tolist()))
    return results


# --------------------------------------------------------------------------- the server actor


class HFRolloutServer:
    """One transformers model serving verl's token-in/token-out ``generate`` (a Ray actor; see the module doc)."""

    def __init__(self, config, model_config, replica_rank: int):
        """``config``: verl's ``RolloutConfig``; ``model_config``: ``actor_rollout_ref.model`` (or an ``HFModelConfig``).

        On a GPU host the replica starts this actor with its worker's device as the
        only visible one (``runtime_env``: the variable must be set before CUDA starts,
        and importing verl starts it).
        """
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        if config.logprobs_mode not in (None, "processed_logprobs"):
            raise ValueError(
                f"the hf rollout returns processed log-probs only; got rollout.logprobs_mode={config.logprobs_mode!r}"
            )
        self.config = config
        self.replica_rank = replica_rank
        self.global_steps = None
        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)  # copies a remote path here
        path = model_config.local_path
        dtype = getattr(
            torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(config.dtype, config.dtype)
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # hf_config carries model.override_config (attention implementation, rope scaling, ...), as the actor's does
        self.model = AutoModelForCausalLM.from_pretrained(
            path, config=model_config.hf_config, dtype=dtype, trust_remote_code=model_config.trust_remote_code
        )
        self.model.to(self.device).eval()
        generation = self.model.generation_config  # the model directory's generation_config.json
        eos = generation.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else generation.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self.max_model_len = config.max_model_len or config.prompt_length + config.response_length
        self._pending: list = []
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._incoming: dict[str, torch.Tensor] = {}
        torch.manual_seed(config.seed + replica_rank)

    # ---- generation

    async def generate(
        self,
        prompt_ids,
        sampling_params: dict,
        request_id: str,
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        priority: int = 0,
        **kwargs,
    ):
        """verl's ``TokenOutput`` for one prompt (``sampling_params`` as the agent loop sends them)."""
        from verl.utils import normalize_token_ids
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("the hf rollout server is text-only; this request carries images, video or audio")
        prompt_ids = normalize_token_ids(prompt_ids)
        params = dict(sampling_params)
        budget = self.max_model_len - len(prompt_ids)
        if budget < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room within max_model_len {self.max_model_len}"
            )
        requested = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if requested is None:
            requested = min(
                self.config.response_length, self.config.prompt_length + self.config.response_length - len(prompt_ids)
            )
        sampling = Sampling.from_request(params, max(1, min(int(requested), budget)), self.config.ignore_eos)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt_ids, sampling, future))
        self._ensure_batcher()
        tokens, log_probs = await future
        return TokenOutput(
            token_ids=tokens,
            log_probs=log_probs,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    def _ensure_batcher(self) -> None:
        # Started on the first request; started again if it ended or belongs to another event loop (Ray keeps
        # one loop per actor, asyncio.run in the tests makes a new one each time).
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.done() or self._batcher.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._batcher = loop.create_task(self._batch_loop())
        self._wake.set()

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.005)  # let the requests of one agent-loop wave arrive together
            while self._pending:
                first_sampling = self._pending[0][1]
                group = [r for r in self._pending if r[1] == first_sampling][: self.config.max_num_seqs]
                taken = {id(r) for r in group}
                self._pending = [r for r in self._pending if id(r) not in taken]
                try:
                    results = await asyncio.to_thread(
                        generate_batch, self.model, [r[0] for r in group], first_sampling, self.pad_id, self.eos_ids
                    )
                except BaseException as exc:
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, _, future), result in zip(group, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    # ---- weights

    async def load_weights(self, named: dict[str, torch.Tensor], is_last: bool) -> int:
        """Collect one bucket of a sync; the last one loads them all: every model tensor, shapes matching.

        A sync that does not match the model (a missing, unknown or reshaped tensor)
        raises ``ValueError`` and changes no weight.
        """
        self._incoming.update(named)
        if not is_last:
            return len(self._incoming)
        incoming, self._incoming = self._incoming, {}
        state = self.model.state_dict()
        tied_head = getattr(self.model.config, "tie_word_embeddings", False)
        missing = sorted(k for k in set(state) - set(incoming) if not (tied_head and k.endswith("lm_head.weight")))
        unknown = sorted(set(incoming) - set(state))
        reshaped = sorted(k for k in set(incoming) & set(state) if incoming[k].shape != state[k].shape)
        if missing or unknown or reshaped:
            raise ValueError(
                f"weight sync does not match the rollout model: missing {missing[:5]}, unknown "
                f"{unknown[:5]}, other shapes {reshaped[:5]}; no weight was changed"
            )
        with torch.no_grad():
            for name, tensor in incoming.items():
                state[name].copy_(tensor)
        return len(incoming)

    # ---- verl's replica control calls

    async def wake_up(self, tags: list[str] | None = None):
        if self.device.type == "cuda" and self.config.free_cache_engine:
            self.model.to(self.device)

    async def sleep(self):
        if self.device.type == "cuda" and self.config.free_cache_engine:
            self.model.to("cpu")  # frees the accelerator for the colocated training engine
            torch.cuda.empty_cache()

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    async def clear_kv_cache(self):
        pass  # generate() keeps no cache between calls

    async def release_kv_cache(self):
        pass

    async def resume_kv_cache(self):
        pass

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        return {"aborted_count": 0, "request_ids": []}  # the sync trainer never aborts; requests run to the end

    async def resume_generation(self):
        pass

    async def start_profile(self, **kwargs):
        pass

    async def stop_profile(self):
        pass


# --------------------------------------------------------------------------- verl's replica and adapter


class HFReplica(RolloutReplica):
    """One :class:`HFRolloutServer` per replica, on its worker's node, seeing its worker's accelerator."""

    async def launch_servers(self):
        if self.rollout_mode != RolloutMode.HYBRID:
            raise ValueError(
                f"rollout.name=hf supports verl's hybrid mode (the trainer's workers hold the rollout), "
                f"not {self.rollout_mode.value!r}"
            )
        if self.world_size != 1 or len(self.workers) != 1:
            raise ValueError(f"rollout.name=hf serves one model per rank; this replica spans {self.world_size} ranks")
        resource = get_resource_name()
        node_id, accelerators = await self.workers[0].__ray_call__.remote(
            lambda worker: (
                ray.get_runtime_context().get_node_id(),
                ray.get_runtime_context().get_accelerator_ids().get(resource, []),
            )
        )
        # Ray gives the server no accelerator of its own (its worker holds it): show it the worker's, from the start
        env_vars = {var: "1" for var in get_platform().ray_noset_envvars()}
        if get_device_name() != "cpu" and accelerators:
            env_vars[get_visible_devices_keyword()] = ",".join(str(a) for a in accelerators)
        server = (
            ray.remote(HFRolloutServer)
            .options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                runtime_env={"env_vars": env_vars},
                name=server_name(self.replica_rank),
                max_concurrency=self.max_concurrency,
            )
            .remote(self.config, self.model_config, self.replica_rank)
        )
        self.servers = [server]
        # no HTTP endpoint: Ray calls only
        verl_internals.set_replica_server(self, server, f"hf://{server_name(self.replica_rank)}")


class HFServerAdapter(BaseRollout):
    """The actor worker's side of its replica's server: weight sync and sleep/wake (see the module doc)."""

    def __init__(self, config, model_config, device_mesh, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        # one rank per replica (check_rollout_config), so the replica's rank is the worker's
        self.replica_rank = dist.get_rank() if dist.is_initialized() else 0
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self._server = None

    @property
    def server(self):
        if self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        await self.server.wake_up.remote(tags)

    async def release(self):
        await self.server.sleep.remote()

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        """Send every ``(name, tensor)`` to the server, in buckets of ``bucket_bytes``; the last call loads them."""
        if wire_format != "named_tensors":
            raise ValueError(f"the hf rollout takes full named tensors, not wire_format={wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise ValueError("the hf rollout loads full weights: with LoRA set actor_rollout_ref.model.lora.merge=true")
        bucket, size = {}, 0
        for name, tensor in weights:
            bucket[name] = tensor.detach().to("cpu", copy=True)
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                await self.server.load_weights.remote(bucket, False)
                bucket, size = {}, 0
        await self.server.load_weights.remote(bucket, True)
        if kwargs.get("global_steps") is not None:
            await self.server.set_global_steps.remote(kwargs["global_steps"])


register()  # importing this module is what makes rollout.name=hf valid
