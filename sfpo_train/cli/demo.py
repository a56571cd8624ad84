"""``sfpo demo``: the landed parts of sfpo on a real (tiny, randomly initialised) Qwen2 model.

Part 1, SFPO's Stage II, per snapshot backend that can run here:

1. ``snapshot`` the trainable parameters (theta_0);
2. K AdamW steps on a language-model loss over random tokens (the fast
   trajectory, theta_K);
3. ``reposition_`` with alpha: theta <- theta_0 + alpha * (theta_K - theta_0);
4. checks every parameter against ``sfpo_kernels.reference`` bit for bit, and
   that alpha 1 / 0 are exact, and prints what it measured.

Part 2, the fused GRPO loss and the update rule: ``grpo_loss`` on a batch of
random "rollouts" checked against the float64 eager reference (loss and
logits gradient), then a few ``SFPO.step`` iterations whose passes use it.

The model, batch and optimizer are seeded, so every backend sees the same
theta_0 and theta_K.
"""

from __future__ import annotations

import argparse

import torch

import sfpo_kernels
from sfpo_kernels import reference, triton_interpreting
from sfpo_train.clock import StageClock

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha", type=float, default=0.8, help="reposition step alpha in [0, 1] (default 0.8, the paper's)"
    )
    parser.add_argument("--inner-steps", type=int, default=3, help="K, AdamW steps of the fast trajectory (default 3)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--hidden", type=int, default=64, help="model hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="model layers (default 2)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype (default fp32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--offload", choices=["none", "cpu"], default="none", help="where the snapshot lives")
    parser.add_argument(
        "--backend",
        action="append",
        choices=list(sfpo_kernels.BACKENDS),
        help="backend(s) to run; repeatable (default: every backend that can run here)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, tokens and optimizer (default 0)")
    parser.add_argument("--sfpo-steps", type=int, default=3, help="SFPO iterations in part 2 (default 3)")


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.inner_steps < 0:
        raise ValueError(f"--inner-steps must be >= 0, got {args.inner_steps}")
    if args.sfpo_steps < 0:
        raise ValueError(f"--sfpo-steps must be >= 0, got {args.sfpo_steps}")
    for name in ("hidden", "layers", "vocab"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but torch sees no CUDA device")
    if args.hidden % 4:
        raise ValueError(f"--hidden must be a multiple of 4 (4 attention heads), got {args.hidden}")


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` in this process."""
    if device.type == "cuda":
        from sfpo_kernels._cuda_lib import nvcc_path

        try:
            nvcc_path()
            return ["triton", "cuda", "torch"]
        except RuntimeError:
            return ["triton", "torch"]
    return ["torch", "triton"] if triton_interpreting() else ["torch"]


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).to(device=device, dtype=DTYPES[args.dtype])


def run_backend(args: argparse.Namespace, device: torch.device, backend: str) -> dict:
    model = build_model(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (4, 32), generator=gen).to(device)
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    clock = StageClock(device)
    snap = sfpo_kernels.snapshot(params, offload=args.offload, backend=backend)
    t_snapshot = clock.lap()
    theta_0 = [v.detach().to(device, copy=True) for v in snap.values()]

    losses = []
    for _ in range(args.inner_steps):  # Stage I: the fast trajectory
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    theta_k = [p.detach().clone() for p in params]

    clock.lap()
    sfpo_kernels.reposition_(params, snap, args.alpha, backend=backend)  # Stage II
    t_reposition = clock.lap()

    expected = [t.clone() for t in theta_k]
    reference.reposition_(expected, theta_0, args.alpha)
    mismatched = sum(int((p.detach() != e).sum()) for p, e in zip(params, expected))
    max_move = max(float((p.detach().double() - t.double()).abs().max()) for p, t in zip(params, theta_0))

    # The bit-exact ends, on copies: alpha 1 keeps theta_K, alpha 0 restores theta_0.
    ends_exact = True
    for alpha, want in ((1.0, theta_k), (0.0, theta_0)):
        trial = [t.clone() for t in theta_k]
        sfpo_kernels.reposition_(trial, sfpo_kernels.snapshot(theta_0, backend=backend), alpha, backend=backend)
        ends_exact &= all(torch.equal(a, b) for a, b in zip(trial, want))

    nbytes = snap.nbytes
    del snap  # SFPO frees the snapshot before the slow correction's step returns
    return {
        "backend": backend,
        "tensors": len(params),
        "elements": sum(p.numel() for p in params),
        "snapshot_bytes": nbytes,
        "losses": losses,
        "snapshot_ms": 1e3 * t_snapshot,
        "reposition_ms": 1e3 * t_reposition,
        "mismatched_elements": mismatched,
        "max_move_from_theta0": max_move,
        "ends_exact": ends_exact,
    }


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit status (1 if any check failed)."""
    _check_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = args.backend or available_backends(device)
    print(
        f"sfpo demo: Qwen2 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}) on {device}"
    )
    print(
        f"  theta_0 -> {args.inner_steps} AdamW steps (lr {args.lr}) -> reposition alpha={args.alpha}, "
        f"offload={args.offload}"
    )
    if device.type == "cpu" and "triton" not in backends:
        print("  (the triton backend runs on CPU only under TRITON_INTERPRET=1; skipped)")
    elif device.type == "cpu":
        print("  (triton runs in its CPU interpreter here: results are real, its timings are not)")
    failed = False
    for backend in backends:
        r = run_backend(args, device, backend)
        ok = r["mismatched_elements"] == 0 and r["ends_exact"]
        failed |= not ok
        print(
            f"  [{backend:>6}] {r['tensors']} tensors, {r['elements']:,} elements, snapshot {r['snapshot_bytes'] / 2**20:.2f} MiB "
            f"in {r['snapshot_ms']:.2f} ms; loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}; "
            f"reposition {r['reposition_ms']:.2f} ms, max |theta - theta_0| {r['max_move_from_theta0']:.3g}; "
            f"vs reference: {r['mismatched_elements']} elements differ; alpha 0/1 exact: {r['ends_exact']} "
            f"-> {'OK' if ok else 'FAILED'}"
        )
    loss_backend = "triton" if "triton" in backends else "torch"  # csrc/ has no loss kernel
    failed |= not run_loss_and_sfpo(args, device, loss_backend)
    print("sfpo demo: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0


# Fused loss vs the float64 reference: fp32 agrees to rounding; low-precision logits
# round dlogits once to their dtype (8 / 11 significant bits).
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2**-7, "fp16": 2**-10}


def run_loss_and_sfpo(args: argparse.Namespace, device: torch.device, backend: str) -> bool:
    from sfpo_train import SFPO, SFPOConfig

    model = build_model(args, device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    tokens = torch.randint(0, args.vocab, (8, 17), generator=gen).to(device)
    mask = torch.ones(8, 16, device=device)
    mask[::3, 10:] = 0  # some responses end early
    advantages = torch.randn(8, 1, generator=gen).expand(8, 16).contiguous().to(device)
    labels = tokens[:, 1:]
    with torch.no_grad():
        old, _ = sfpo_kernels.logprob_entropy(model(tokens).logits[:, :-1], labels, backend=backend)

    logits = model(tokens).logits[:, :-1].detach().requires_grad_(True)
    fused = sfpo_kernels.grpo_loss(logits, labels, old, advantages, mask, entropy_coef=0.01, backend=backend)
    fused.loss.backward()
    exact = logits.detach().double().requires_grad_(True)
    ref_loss, _, _, _ = reference.grpo_loss(exact, labels, old.double(), advantages.double(), mask, entropy_coef=0.01)
    ref_loss.backward()
    scale = float(exact.grad.abs().max()) or 1.0
    loss_err = abs(fused.loss.item() - ref_loss.item())
    grad_err = float((logits.grad.double() - exact.grad).abs().max()) / scale
    tol = LOSS_TOLERANCE[args.dtype]
    ok = loss_err <= tol * max(1.0, abs(ref_loss.item())) and grad_err <= tol
    print(
        f"  [{backend:>6}] grpo_loss on {tuple(logits.shape)} logits: loss {fused.loss.item():.5f}, vs float64 "
        f"reference |dloss| {loss_err:.2e}, max |dgrad| / max |grad| {grad_err:.2e} (tolerance {tol:.0e}) "
        f"-> {'OK' if ok else 'FAILED'}"
    )

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def update_pass(_batch):
        opt.zero_grad(set_to_none=True)
        out = sfpo_kernels.grpo_loss(model(tokens).logits[:, :-1], labels, old, advantages, mask, backend=backend)
        out.loss.backward()
        opt.step()
        return {k: float(v) for k, v in out.metrics.items()}

    sfpo = SFPO(
        model,
        SFPOConfig(inner_steps=args.inner_steps, alpha=args.alpha, zscore_window=2, snapshot_offload=args.offload),
    )
    for it in range(args.sfpo_steps):
        m = sfpo.step(update_pass, None)
        stages = ", ".join(f"{k.split('/sfpo_')[1]} {1e3 * v:.1f}" for k, v in m.items() if k.startswith("timing_s/"))
        print(
            f"  SFPO step {it}: alpha {m['sfpo/alpha']:.2f}, {m['sfpo/inner_steps_run']:.0f} fast passes "
            f"on the same batch, pg_loss {m['pg_loss']:+.4f}, clipfrac {m['pg_clipfrac']:.2f}, entropy {m['entropy']:.3f}, "
            f"z {m['sfpo/zscore']:.2f}; ms: {stages}"
        )
    return ok
