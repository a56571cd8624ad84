"""``sfpo demo``: SFPO's Stage II on a real (tiny, randomly initialised) Qwen2 model.

What it does, per backend that can run here:

1. ``snapshot`` the trainable parameters (theta_0);
2. K AdamW steps on a language-model loss over random tokens (the fast
   trajectory, theta_K);
3. ``reposition_`` with alpha: theta <- theta_0 + alpha * (theta_K - theta_0);
4. checks every parameter against ``sfpo_kernels.reference`` bit for bit, and
   that alpha 1 / 0 are exact, and prints what it measured.

The model, batch and optimizer are seeded, so every backend sees the same
theta_0 and theta_K.
"""

from __future__ import annotations

import argparse
import time

import torch

import sfpo_kernels
from sfpo_kernels import reference
from sfpo_kernels import triton_interpreting

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=float, default=0.8, help="reposition step alpha in [0, 1] (default 0.8, the paper's)")
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


def _check_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.inner_steps < 0:
        raise ValueError(f"--inner-steps must be >= 0, got {args.inner_steps}")
    for name in ("hidden", "layers", "vocab"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_backend(args: argparse.Namespace, device: torch.device, backend: str) -> dict:
    model = build_model(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (4, 32), generator=gen).to(device)
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    _sync(device)
    t0 = time.perf_counter()
    snap = sfpo_kernels.snapshot(params, offload=args.offload, backend=backend)
    _sync(device)
    t_snapshot = time.perf_counter() - t0
    theta_0 = [v.detach().to(device, copy=True) for v in snap.values()]

    losses = []
    for _ in range(args.inner_steps):  # Stage I: the fast trajectory
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    theta_k = [p.detach().clone() for p in params]

    _sync(device)
    t0 = time.perf_counter()
    sfpo_kernels.reposition_(params, snap, args.alpha, backend=backend)  # Stage II
    _sync(device)
    t_reposition = time.perf_counter() - t0

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
    print(f"sfpo demo: Qwen2 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}) on {device}")
    print(f"  theta_0 -> {args.inner_steps} AdamW steps (lr {args.lr}) -> reposition alpha={args.alpha}, "
          f"offload={args.offload}")  # fmt: skip
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
    print("sfpo demo: " + ("FAILED" if failed else "all checks passed"))
    return 1 if failed else 0
