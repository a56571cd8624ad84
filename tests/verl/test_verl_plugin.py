"""SFPO inside real verl 0.9.1 (no mocks), on CPU: verl's own FSDP2 actor worker, a tiny random Qwen2.

What must hold, and why each comparison is exact or not:

- one SFPO iteration through our worker == the manual composition with verl's own
  worker (snapshot; K ``update_actor`` calls; reposition; one more call), bit for bit:
  the same verl code runs the same float operations in the same order, and the
  reposition is the same fp32 lerp (``torch._foreach_lerp_`` == ``torch.lerp``);
- alpha = 0 is plain verl GRPO, bit for bit; the LR scheduler steps once per iteration;
- 2 gloo processes (FSDP2 shards every parameter) == 1 process within fp32
  tolerance: the gradient reduction and loss normalisation sum in another order
  (``TOL_DISTRIBUTED`` below, about 100 fp32 ulps after 8 Adam steps at lr 1e-2);
- the fused log-prob path (Triton kernel, interpreted on CPU) == verl's eager path
  within ``TOL_FUSED``: online log-sum-exp vs log_softmax, a few fp32 ulps per token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.optional import import_or_skip

import_or_skip("verl")

from tests.helpers import verl_scenarios as vs

TOL_DISTRIBUTED = {"atol": 1e-5, "rtol": 1e-4}
TOL_FUSED = {"atol": 2e-5, "rtol": 1e-4}
TESTS = Path(__file__).resolve().parent


def _assert_params_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: parameter {name} differs"


def _manual_sfpo(worker, batch_seed: int, inner_steps: int, alpha: float, slow_correction: bool = True) -> None:
    """Algorithm 1 by hand on verl's own worker: theta_0, K updates, reposition, one more update (Stage III)."""
    params = [p.to_local() for p in worker.actor.engine.module.parameters()]
    theta_0 = [p.detach().clone() for p in params]
    for _ in range(inner_steps):
        worker.update_actor(vs.make_batch(batch_seed, entropy=None))
    with torch.no_grad():
        for p, p0 in zip(params, theta_0, strict=True):
            p.copy_(torch.lerp(p, p0, 1.0 - alpha))  # theta_0 + alpha (theta_K - theta_0)
    if slow_correction:
        worker.update_actor(vs.make_batch(batch_seed, entropy=None))


# ---------------------------------------------------------------------------- the iteration


def test_sfpo_iteration_equals_manual_composition(model_dir):
    ours = vs.make_worker(vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"]))
    metrics = vs.metrics_of(ours.update_actor(vs.make_batch(1)))
    theirs = vs.make_worker(vs.compose(model_dir), sfpo=False)
    before = vs.actor_params(theirs)
    _manual_sfpo(theirs, 1, inner_steps=3, alpha=0.8)

    got, want = vs.actor_params(ours), vs.actor_params(theirs)
    _assert_params_equal(got, want, "SFPO worker vs manual composition")
    assert any(not torch.equal(want[n], before[n]) for n in want), "the updates did not move the parameters"
    # the scheduler: once per SFPO iteration; verl's worker stepped it on each of its 4 calls
    assert ours.actor.engine.lr_scheduler.last_epoch == 1
    assert theirs.actor.engine.lr_scheduler.last_epoch == 4
    assert len(metrics["lr"]) == 1
    # verl's metrics from all 4 passes x 2 mini-batches, and ours
    assert len(metrics["actor/pg_loss"]) == 8 and len(metrics["grad_norm"]) == 8
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy_loss", "loss", "mfu"):
        assert key in metrics, key
    assert metrics["sfpo/alpha"] == [0.8]
    assert metrics["sfpo/passes"] == [4.0]
    assert metrics["sfpo/inner_steps_run"] == [3.0]
    assert metrics["sfpo/entropy"] == [vs.ITERATION_ENTROPY]
    assert metrics["sfpo/snapshot_bytes"][0] == sum(p.numel() * 4 for p in got.values())
    assert ours.actor.sfpo.entropies[-1] == vs.ITERATION_ENTROPY


def test_alpha_zero_is_plain_verl_grpo(model_dir):
    ours = vs.make_worker(
        vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true", "actor_rollout_ref.actor.sfpo.alpha=0"])
    )
    metrics = vs.metrics_of(ours.update_actor(vs.make_batch(2)))
    theirs = vs.make_worker(vs.compose(model_dir), sfpo=False)
    theirs_metrics = vs.metrics_of(theirs.update_actor(vs.make_batch(2, entropy=None)))

    _assert_params_equal(vs.actor_params(ours), vs.actor_params(theirs), "alpha=0 vs verl GRPO")
    assert metrics["sfpo/passes"] == [1.0] and metrics["sfpo/alpha"] == [0.0]
    assert metrics["actor/pg_loss"] == theirs_metrics["actor/pg_loss"]
    assert ours.actor.engine.lr_scheduler.last_epoch == theirs.actor.engine.lr_scheduler.last_epoch == 1


def test_disabled_sfpo_is_verl_unchanged(model_dir):
    ours = vs.make_worker(vs.compose(model_dir))  # our worker, sfpo.enable=false
    assert ours.actor.sfpo is None
    ours.update_actor(vs.make_batch(3))  # the sfpo_entropy key is dropped, not fed to verl
    theirs = vs.make_worker(vs.compose(model_dir), sfpo=False)
    theirs.update_actor(vs.make_batch(3, entropy=None))
    _assert_params_equal(vs.actor_params(ours), vs.actor_params(theirs), "disabled SFPO vs verl")


def test_missing_entropy_is_a_clear_error(model_dir):
    ours = vs.make_worker(vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"]))
    with pytest.raises(ValueError, match="sfpo_entropy"):
        ours.update_actor(vs.make_batch(1, entropy=None))


# ---------------------------------------------------------------------------- FSDP2 across 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(model_dir, tmp_path):
    out = tmp_path / "params.pt"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(TESTS.parent / "helpers" / "verl_scenarios.py"),
                    "sfpo-iteration",
                    model_dir,
                    str(out),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    sharded = torch.load(out)
    _check_rank_agreement([json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)])

    # The same global mini-batches in one process: rank r held rows 4r..4r+3 and took 2 per mini-batch.
    single = vs.make_worker(vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"]))
    single.update_actor(vs.make_batch(1, rows=vs.TWO_RANK_ORDER))
    want = vs.actor_params(single)
    assert sharded.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(sharded[name], want[name], **TOL_DISTRIBUTED, msg=lambda m, n=name: f"{n}: {m}")


def _check_rank_agreement(ranks: list[dict]) -> None:
    """What the 2-process script saw after its first iteration (tests/helpers/verl_scenarios.py)."""
    # rank 1's copy of the checkpoint had no sfpo_state.json: it resumed with rank 0's state, broadcast
    assert [r["resumed_iteration"] for r in ranks] == [1, 1]
    assert ranks[0]["entropies"] == ranks[1]["entropies"] == [vs.ITERATION_ENTROPY]
    # one SFPO iteration (K + 1 passes) stepped the LR scheduler once on every rank
    assert all(r["lr_epochs"][1] == r["lr_epochs"][0] + 1 for r in ranks), ranks
    # rank 1's schedule changed by hand: every rank refused the iteration, naming the difference
    for r in ranks:
        assert r["error"] is not None and "differs across ranks" in r["error"] and "alpha in [0.0, 0.8]" in r["error"]


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_carries_sfpo_state(model_dir, tmp_path):
    # window 2, tau 0.5: entropies 1.0 then 2.0 give z = 1 at iteration 1, so iteration 2 runs alpha 0
    overrides = [
        "actor_rollout_ref.actor.sfpo.enable=true",
        "actor_rollout_ref.actor.sfpo.zscore_window=2",
        "actor_rollout_ref.actor.sfpo.zscore_threshold=0.5",
    ]
    first = vs.make_worker(vs.compose(model_dir, overrides))
    first.update_actor(vs.make_batch(1, entropy=1.0))
    first.update_actor(vs.make_batch(2, entropy=2.0))
    assert first.actor.sfpo.fired_at == 1
    ckpt = tmp_path / "global_step_2" / "actor"
    first.save_checkpoint(str(ckpt), global_step=2)
    assert (ckpt / "sfpo_state.json").exists()

    resumed = vs.make_worker(vs.compose(model_dir, overrides))
    assert resumed.actor.sfpo.alpha == 0.8  # before loading: a fresh schedule
    resumed.load_checkpoint(str(ckpt))
    assert _same_state(resumed.actor.sfpo.state_dict(), first.actor.sfpo.state_dict())
    _assert_params_equal(vs.actor_params(resumed), vs.actor_params(first), "resumed weights")

    m_first = vs.metrics_of(first.update_actor(vs.make_batch(3, entropy=2.5)))
    m_resumed = vs.metrics_of(resumed.update_actor(vs.make_batch(3, entropy=2.5)))
    assert m_resumed["sfpo/alpha"] == m_first["sfpo/alpha"] == [0.0]
    assert m_resumed["sfpo/passes"] == [1.0]
    _assert_params_equal(vs.actor_params(resumed), vs.actor_params(first), "after one more iteration")


def _same_state(a: dict, b: dict) -> bool:
    """state_dict equality where NaN == NaN (last_zscore before the window fills)."""
    import math

    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


# ---------------------------------------------------------------------------- config keys


AUTHORS = [
    "+actor_rollout_ref.actor.use_sfpo=True",
    "+actor_rollout_ref.actor.sfpo_inner_steps=2",
    "+actor_rollout_ref.actor.sfpo_step_size=0.5",
    "+actor_rollout_ref.actor.zscore_w=5",
    "+actor_rollout_ref.actor.zscore_threshold=0.7",
]


def test_authors_keys_compose_and_take_effect(model_dir):
    worker = vs.make_worker(vs.compose(model_dir, AUTHORS))
    cfg = worker.actor.sfpo.config
    assert (cfg.inner_steps, cfg.alpha, cfg.zscore_window, cfg.zscore_threshold) == (2, 0.5, 5, 0.7)
    metrics = vs.metrics_of(worker.update_actor(vs.make_batch(1)))
    assert metrics["sfpo/passes"] == [3.0] and metrics["sfpo/alpha"] == [0.5]
    assert worker.actor.engine.lr_scheduler.last_epoch == 1


def test_ablation_keys_take_effect_through_the_plugin(model_dir):
    """slow_correction=false: K passes and the reposition, no slow pass, the LR scheduler stepped once (on pass K)."""
    ours = vs.make_worker(
        vs.compose(
            model_dir,
            ["actor_rollout_ref.actor.sfpo.enable=true", "actor_rollout_ref.actor.sfpo.slow_correction=false"],
        )
    )
    assert ours.actor.sfpo.config.slow_correction is False
    metrics = vs.metrics_of(ours.update_actor(vs.make_batch(4)))
    theirs = vs.make_worker(vs.compose(model_dir), sfpo=False)
    _manual_sfpo(theirs, 4, inner_steps=3, alpha=0.8, slow_correction=False)

    _assert_params_equal(vs.actor_params(ours), vs.actor_params(theirs), "slow_correction=false vs manual")
    assert metrics["sfpo/passes"] == [3.0] and metrics["sfpo/inner_steps_run"] == [3.0]
    assert ours.actor.engine.lr_scheduler.last_epoch == 1


def test_config_normalisation_leaves_verl_a_valid_config(model_dir):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import ActorConfig

    from sfpo_train.verl.main import prepare_config

    config = vs.compose(model_dir, [*AUTHORS, "algorithm.adv_estimator=grpo"])
    from hydra.errors import InstantiationException

    # what stock verl does with these keys: its ActorConfig rejects them
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'sfpo'"):
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    prepare_config(config)
    actor = config.actor_rollout_ref.actor
    assert "sfpo" not in actor and not any(k in actor for k in ("use_sfpo", "sfpo_step_size", "zscore_w"))
    assert isinstance(omega_conf_to_dataclass(actor), ActorConfig)
    assert config.actor_rollout_ref.sfpo.enable is True and config.actor_rollout_ref.sfpo.alpha == 0.5
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def test_importing_sfpo_does_not_import_verl():
    code = "import sys, sfpo_train, sfpo_kernels, sfpo_train.verl; assert 'verl' not in sys.modules, 'verl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_workers_read_the_drivers_block_and_refuse_a_config_that_skipped_it():
    from omegaconf import OmegaConf

    from sfpo_train.verl.config import normalize_sfpo_config, normalized_settings

    arr = OmegaConf.create({"actor": {"sfpo": {"enable": True, "alpha": 0.5}, "zscore_w": 5}})
    with pytest.raises(ValueError, match=r"still holds SFPO keys \['sfpo', 'zscore_w'\]"):
        normalized_settings(arr)
    settings = normalize_sfpo_config(arr)  # what the driver does, once
    assert normalized_settings(arr) == settings and settings.sfpo.alpha == 0.5 and settings.sfpo.zscore_window == 5


def test_conflicting_and_bad_keys_are_value_errors(model_dir):
    from sfpo_train.verl.config import normalize_sfpo_config

    config = vs.compose(
        model_dir, ["actor_rollout_ref.actor.sfpo.alpha=0.7", "+actor_rollout_ref.actor.sfpo_step_size=0.5"]
    )
    with pytest.raises(ValueError, match=r"actor\.sfpo\.alpha=0\.7 and actor_rollout_ref\.actor\.sfpo_step_size=0\.5"):
        normalize_sfpo_config(config.actor_rollout_ref)
    config = vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.alpha=1.5"])
    with pytest.raises(ValueError, match=r"SFPOConfig\.alpha must be in \[0, 1\], got 1\.5"):
        normalize_sfpo_config(config.actor_rollout_ref)
    config = vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.fused_kernels=maybe"])
    with pytest.raises(ValueError, match="fused_kernels must be auto, true or false, got 'maybe'"):
        normalize_sfpo_config(config.actor_rollout_ref)
    config = vs.compose(model_dir, ["+actor_rollout_ref.actor.sfpo.inner_step=2"])
    with pytest.raises(ValueError, match=r"unknown keys \['inner_step'\]"):
        normalize_sfpo_config(config.actor_rollout_ref)


# ---------------------------------------------------------------------------- fused kernels inside verl


@pytest.fixture
def restore_qwen2_forward():
    """verl (and then we) patch the HF class's forward for the fused path; give the next test the original."""
    import transformers

    original = transformers.Qwen2ForCausalLM.forward
    yield
    transformers.Qwen2ForCausalLM.forward = original


def _grads_at_step(worker) -> list[list[torch.Tensor]]:
    """The gradients each optimizer step sees (verl zeroes them when the update ends)."""
    seen: list[list[torch.Tensor]] = []
    params = list(worker.actor.engine.module.parameters())
    worker.actor.engine.optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.to_local().detach().clone() for p in params])
    )
    return seen


def _log_probs(worker, seed: int):
    from verl.utils import tensordict_utils as tu

    batch = vs.make_batch(seed, entropy=None)
    tu.assign_non_tensor(batch, calculate_entropy=True, compute_loss=False)
    out = worker.compute_log_prob(batch)
    return tu.get(out, "log_probs").values(), tu.get(out, "entropy").values()


def test_fused_kernels_match_verls_eager_loss_and_gradients(model_dir, monkeypatch, restore_qwen2_forward):
    from sfpo_train.verl import fused

    # verl's eager path first: the fused worker patches the model class every worker shares.
    eager = vs.make_worker(vs.compose(model_dir), sfpo=False)
    eager_logp, eager_h = _log_probs(eager, 4)
    eager_grads = _grads_at_step(eager)
    eager_m = vs.metrics_of(eager.update_actor(vs.make_batch(4, entropy=None, mini_batch=vs.BATCH)))

    monkeypatch.setenv("SFPO_BACKEND", "triton")  # the Triton kernel, in the interpreter on CPU
    ours = vs.make_worker(vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.fused_kernels=true"]))
    assert ours.fused_kernels
    assert fused.install_logprob_forward(ours.actor.engine.module).forward is fused.forward_with_sfpo_kernels
    assert ours.config.actor.policy_loss.loss_mode == fused.POLICY_LOSS_NAME
    fused_logp, fused_h = _log_probs(ours, 4)
    assert getattr(ours.actor.engine.module, fused.CHECK_ATTR) == "passed"  # the first-use check ran and agreed
    fused_grads = _grads_at_step(ours)
    fused_m = vs.metrics_of(ours.update_actor(vs.make_batch(4, mini_batch=vs.BATCH)))

    torch.testing.assert_close(fused_logp, eager_logp, **TOL_FUSED, msg=lambda m: f"log_probs: {m}")
    torch.testing.assert_close(fused_h, eager_h, **TOL_FUSED, msg=lambda m: f"entropy: {m}")
    for key in ("actor/pg_loss", "actor/entropy_loss", "actor/pg_clipfrac", "actor/ppo_kl", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(fused_m[key]), torch.tensor(eager_m[key]), **TOL_FUSED, msg=lambda m, k=key: f"{k}: {m}"
        )
    assert len(fused_grads) == len(eager_grads) == 1
    names = [n for n, _ in ours.actor.engine.module.named_parameters()]
    for name, got, want in zip(names, fused_grads[0], eager_grads[0], strict=True):
        assert want.abs().max() > 0, f"{name}: no gradient to compare"
        torch.testing.assert_close(got, want, **TOL_FUSED, msg=lambda m, n=name: f"grad {n}: {m}")
    _assert_params_equal_close(vs.actor_params(ours), vs.actor_params(eager))


def _assert_params_equal_close(got: dict, want: dict) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL_FUSED, msg=lambda m, n=name: f"{n}: {m}")


def test_sfpo_policy_loss_equals_verls_vanilla():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import ActorConfig

    from sfpo_train.verl import fused

    g = torch.Generator().manual_seed(0)
    B, T = 5, 7  # odd sizes, one fully masked row, negative advantages for the dual clip
    log_prob, old = -3 + torch.randn(B, T, generator=g), -3 + torch.randn(B, T, generator=g)
    advantages = torch.randn(B, 1, generator=g).expand(B, T)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[2] = 0
    config = ActorConfig(
        strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1, clip_ratio_high=0.28, rollout_n=1
    )
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        want, want_m = get_policy_loss_fn("vanilla")(old, log_prob, advantages, mask, mode, config)
        got, got_m = get_policy_loss_fn(fused.POLICY_LOSS_NAME)(old, log_prob, advantages, mask, mode, config)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=lambda m, mo=mode: f"pg_loss {mo}: {m}")
        assert got_m.keys() == want_m.keys()
        for key in want_m:
            assert got_m[key] == pytest.approx(want_m[key], rel=1e-6, abs=1e-7), key


# ---------------------------------------------------------------------------- the trainer


def test_trainer_uses_our_worker_and_needs_the_entropy(model_dir):
    from verl.trainer.ppo.utils import Role

    from sfpo_train.verl.main import prepare_config
    from sfpo_train.verl.trainer import SFPOTrainer
    from sfpo_train.verl.worker import SFPOActorRolloutRefWorker

    config = vs.compose(
        model_dir,
        [
            "algorithm.adv_estimator=grpo",
            "actor_rollout_ref.actor.use_kl_loss=true",
            "actor_rollout_ref.actor.sfpo.enable=true",
        ],
    )
    prepare_config(config)
    trainer = SFPOTrainer.__new__(SFPOTrainer)  # only the two overridden methods, no Ray cluster
    trainer.config = config
    trainer._init_resource_pool_mgr()
    assert trainer.role_worker_mapping[Role.ActorRolloutRef].__ray_actor_class__ is SFPOActorRolloutRefWorker
    with pytest.raises(ValueError, match="actor/entropy"):
        trainer._update_actor(batch=None, metrics={})


def test_entry_point_rejects_unsupported_trainers(model_dir):
    from sfpo_train.verl.main import prepare_config

    config = vs.compose(
        model_dir, ["actor_rollout_ref.actor.sfpo.enable=true", "trainer.v1.trainer_mode=separate_async"]
    )
    with pytest.raises(ValueError, match="trainer_mode='separate_async' is not supported"):
        prepare_config(config)


def test_lr_scheduler_steps_once_per_iteration_or_the_worker_raises(model_dir, monkeypatch):
    from verl.workers.engine_workers import TrainingWorker

    from sfpo_train.verl.worker import SFPOTrainingWorker

    worker = vs.make_worker(vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"]))
    scheduler = worker.actor.engine.lr_scheduler
    before = scheduler.last_epoch
    worker.update_actor(vs.make_batch(1))  # K=3 fast passes and the slow one
    assert scheduler.last_epoch == before + 1
    # as if verl stepped the scheduler in every pass (our hold lost): 4 steps in one iteration, refused
    monkeypatch.setattr(SFPOTrainingWorker, "train_batch", TrainingWorker.train_batch)
    with pytest.raises(RuntimeError, match="stepped 4 times in one SFPO iteration of 4 passes"):
        worker.update_actor(vs.make_batch(2))


def test_sfpo_off_is_verls_own_run(model_dir):
    from verl.trainer.main_ppo import main as verl_main

    from sfpo_train.verl.config import resolve_fused_kernels
    from sfpo_train.verl.main import needs_sfpo_runner, prepare_config

    auto = ["actor_rollout_ref.actor.sfpo.fused_kernels=auto", "trainer.device=cuda"]
    # SFPO off, fused_kernels auto: verl's entry point runs, whatever trainer it asks for
    config = vs.compose(model_dir, [*auto, "trainer.v1.trainer_mode=separate_async"])
    settings = prepare_config(config)
    assert not resolve_fused_kernels(settings, "cuda") and not needs_sfpo_runner(settings, "cuda")
    assert verl_main.__wrapped__.__module__ == "verl.trainer.main_ppo"  # what run() hands the config to
    # SFPO on, on CUDA: auto turns the kernels on (the workers apply the same rule), and our runner is needed
    settings = prepare_config(vs.compose(model_dir, [*auto, "actor_rollout_ref.actor.sfpo.enable=true"]))
    assert resolve_fused_kernels(settings, "cuda") and not resolve_fused_kernels(settings, "cpu")
    assert needs_sfpo_runner(settings, "cuda")
    # the kernels alone, asked for explicitly, still need our (sync) runner
    config = vs.compose(
        model_dir, ["actor_rollout_ref.actor.sfpo.fused_kernels=true", "trainer.v1.trainer_mode=separate_async"]
    )
    with pytest.raises(ValueError, match="fused_kernels wraps verl's synchronous trainer"):
        prepare_config(config)


def test_a_plugin_that_fails_to_load_says_so(tmp_path):
    broken = tmp_path / "sfpo_kernels"  # found before the real package: a broken build of it
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated broken sfpo_kernels build')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "VERL_USE_EXTERNAL_PLUGINS": "auto"}
    # run in tmp_path: python -c puts the working directory first on sys.path, and ours holds the real package
    out = subprocess.run(
        [sys.executable, "-c", "import verl"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]  # verl itself carries on without the plugin
    assert "sfpo's verl plugin failed to load" in out.stderr, out.stderr[-2000:]
    assert "simulated broken sfpo_kernels build" in out.stderr
