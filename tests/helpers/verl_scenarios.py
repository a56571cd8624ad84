"""Real verl 0.9.1 actor workers on CPU with a tiny random Qwen2, shared by ``test_verl_plugin.py``.

Also a script: ``python tests/helpers/verl_scenarios.py sfpo-iteration MODEL_DIR OUT.pt``
runs one SFPO iteration in each of ``WORLD_SIZE`` gloo processes (FSDP2 shards
the parameters across them) and rank 0 saves the full parameters to ``OUT.pt``;
then each rank resumes from a checkpoint only rank 0's copy of has
``sfpo_state.json`` of, and changes its schedule (``OUT.pt.rank<r>.json``).
"""

from __future__ import annotations

import os
import sys

import torch

VOCAB = 97
BATCH, PROMPT, RESPONSE = 8, 5, 6
MINI_BATCH = 4  # two optimizer steps per pass
ITERATION_ENTROPY = 4.5  # stands in for verl's actor/entropy
# With 2 data-parallel ranks, rank r holds rows 4r..4r+3 and each takes 2 rows per mini-batch, so the
# global mini-batches are rows {0, 1, 4, 5} and {2, 3, 6, 7}: one process sees the same ones in this order.
TWO_RANK_ORDER = [0, 1, 4, 5, 2, 3, 6, 7]


def setup_cpu() -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from sfpo_train.verl.cpu_runtime.engine import use_cpu

    use_cpu()


def save_tiny_qwen2(path: str) -> str:
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def compose(model_dir: str, overrides: list[str] = ()):
    """Our hydra config (verl's ppo_trainer + the sfpo block) with the CPU settings, then ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sfpo_train.verl import CONFIG_DIR, CONFIG_NAME

    base = [
        f"actor_rollout_ref.model.path={model_dir}",
        "+actor_rollout_ref.model.load_tokenizer=false",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        "actor_rollout_ref.actor.strategy=fsdp2",
        # fp32 end to end, so a 2-process run can be compared with a 1-process one tightly
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.rollout.n=1",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.sfpo.fused_kernels=false",
        # torch.compile of the entropy costs ~12 s of inductor time per process on CPU
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(CONFIG_NAME, overrides=[*base, *overrides])


def make_worker(config, sfpo: bool = True):
    """An initialised actor worker: ours (SFPOActorRolloutRefWorker) or verl's own."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from sfpo_train.verl.config import normalize_sfpo_config
    from sfpo_train.verl.worker import SFPOActorRolloutRefWorker

    arr = config.actor_rollout_ref.copy()
    normalize_sfpo_config(arr)  # as the entry point's driver does; verl's own worker must not see our keys either
    worker = (SFPOActorRolloutRefWorker if sfpo else ActorRolloutRefWorker)(arr, role="actor")
    worker.init_model()
    return worker


def make_batch(
    seed: int = 1,
    entropy: float | None = ITERATION_ENTROPY,
    rows: list[int] | None = None,
    mini_batch: int = MINI_BATCH,
):
    """An update batch as verl's trainer builds it: left-padded prompts, right-padded responses, then no-padding.

    ``rows`` picks (and orders) rows of the 8-row batch: a data-parallel rank's share, or a reordering.
    """
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=g)
    responses = torch.randint(1, VOCAB, (BATCH, RESPONSE), generator=g)
    prompt_mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    response_mask = torch.ones(BATCH, RESPONSE, dtype=torch.long)
    for i in range(BATCH):  # ragged prompts and responses
        prompt_mask[i, : i % 3] = 0
        response_mask[i, RESPONSE - (i % 4) :] = 0
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    old_log_probs = -4.6 + 0.3 * torch.randn(BATCH, RESPONSE, generator=g)
    advantages = torch.randn(BATCH, 1, generator=g).expand(BATCH, RESPONSE).contiguous()
    td = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(1) - 1).clamp_min(0),
            "response_mask": response_mask.float(),
            "old_log_probs": old_log_probs,
            "advantages": advantages,
        },
        batch_size=[BATCH],
    )
    if rows is not None:
        td = td[torch.tensor(rows)]
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(
        td,
        calculate_entropy=True,
        global_batch_size=mini_batch,
        mini_batch_size=mini_batch,
        epochs=1,
        seed=1,
        dataloader_kwargs={"shuffle": False},
        compute_loss=True,
        temperature=1.0,
    )
    if entropy is not None:
        tu.assign_non_tensor(td, sfpo_entropy=entropy)
    return td


def actor_params(worker) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the actor's parameters; a collective under FSDP2 with several ranks."""
    out = {}
    for name, p in worker.actor.engine.module.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def metrics_of(output) -> dict:
    from verl.utils import tensordict_utils as tu

    return tu.get(output, "metrics")


def _sfpo_iteration_script(model_dir: str, out_path: str) -> None:
    setup_cpu()
    config = compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"])
    worker = make_worker(config)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    share = BATCH // world  # what verl's dispatch hands each data-parallel rank: a contiguous chunk
    metrics = metrics_of(worker.update_actor(make_batch(rows=list(range(rank * share, (rank + 1) * share)))))
    # FSDP2 really sharded the parameters, and SFPO's snapshot held this rank's shards only
    module = worker.actor.engine.module
    local = sum(p.to_local().numel() for p in module.parameters())
    full = sum(p.numel() for p in module.parameters())
    if world > 1 and not local < full:
        raise SystemExit(f"rank {rank}: parameters are not sharded ({local} of {full} elements local)")
    snap = metrics["sfpo/snapshot_bytes"][0]  # the local shards, plus the snapshot's per-tensor alignment
    if world > 1 and not 4 * local <= snap < 4 * full:
        raise SystemExit(f"rank {rank}: snapshot of {snap} bytes; local shards hold {4 * local}, the model {4 * full}")
    params = actor_params(worker)
    if int(os.environ["RANK"]) == 0:
        torch.save(params, out_path)
    torch.distributed.barrier()
    _rank_agreement_script(worker, model_dir, out_path, rank)
    torch.distributed.destroy_process_group()


def _rank_agreement_script(worker, model_dir: str, out_path: str, rank: int) -> None:
    """Resume where only rank 0's node has ``sfpo_state.json``, then a schedule changed on one rank.

    Writes ``OUT.pt.rank<r>.json``: the iteration each rank resumed at, the error
    (if any) of the iteration after the change, and the LR scheduler's epochs.
    """
    import json
    import shutil

    from sfpo_train.verl.worker import STATE_FILE

    dist = torch.distributed
    root = os.path.dirname(out_path)
    shared = os.path.join(root, "global_step_1", "actor")
    worker.save_checkpoint(shared, global_step=1)
    dist.barrier()
    local = shared
    if rank > 0:  # this rank's own copy of the checkpoint, as on a node without a shared filesystem
        local = os.path.join(root, f"node{rank}", "actor")
        shutil.copytree(shared, local)
        os.remove(os.path.join(local, STATE_FILE))
    dist.barrier()
    resumed = make_worker(compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"]))
    resumed.load_checkpoint(local)
    result = {"resumed_iteration": resumed.actor.sfpo.iteration, "entropies": list(resumed.actor.sfpo.entropies)}
    share = BATCH // dist.get_world_size()
    rows = list(range(rank * share, (rank + 1) * share))
    scheduler = resumed.actor.engine.lr_scheduler
    before = scheduler.last_epoch
    resumed.update_actor(make_batch(2, rows=rows))  # every rank agrees: runs
    result["lr_epochs"] = [before, scheduler.last_epoch]
    if rank == 1:
        resumed.actor.sfpo.fired_at = 0  # this rank alone now schedules alpha 0
    try:
        resumed.update_actor(make_batch(3, rows=rows))
        result["error"] = None
    except RuntimeError as exc:
        result["error"] = str(exc)
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "sfpo-iteration":
        raise SystemExit(f"usage: {sys.argv[0]} sfpo-iteration MODEL_DIR OUT.pt")
    _sfpo_iteration_script(sys.argv[2], sys.argv[3])
