#!/usr/bin/env python3
"""Exact gradient through N DDIM / DPM-Solver++(2M) steps of the learned digits UNet
(data/models/digits_unet_f64.pt, float64): torch autograd through the same loop (plain, and with
torch.utils.checkpoint around every network call) vs diffgrad's discrete adjoint with the
LibTorch adapter (build/benchmarks/unet_gradient, MemoryMode store_all and checkpoint):
gradient agreement, peak memory, time.

The loop (diffgrad's definitions, docs/samplers_dpm_solver.md, solvers/ddim.hpp), on the nodes
of diffusers' schedulers for the model's training table (DDPM linear betas 1e-4..2e-2, 1000
steps, diffusers' float32 alphas_cumprod upcast to float64):
  ddim:    DDIMScheduler(clip_sample=False) (leading spacing, set_alpha_to_one): nodes at its
           timesteps k_i and a last node alpha = 1, sigma = 0;
           x <- (alpha_t/alpha_s) x - sigma_t expm1(lambda_t - lambda_s) eps(x, k_s)
           (last step: x <- x/alpha_s - (sigma_s/alpha_s) eps)
  dpm++2m: DPMSolverMultistepScheduler() (dpmsolver++, order 2, midpoint, linspace spacing,
           final_sigmas_type "zero", lower_order_final): first and last step first order,
           x0 = (x - sigma_s eps)/alpha_s, D1 = (x0_i - x0_{i-1}) h_i/h_{i-1},
           x <- (sigma_t/sigma_s) x - alpha_t expm1(-h) (x0_i + D1/2)
  alpha = sqrt(abar_k), sigma = sqrt(1 - abar_k), lambda = log(alpha/sigma); the network gets the
  integer timestep k (int64 tensor of shape [B]) = the compat layer's node.model_t.
Loss L = <w, x_0>; gradients w.r.t. x_T and every network parameter (named_parameters order,
the adapter's flat order). Batch 4, class labels [0, 3, 7, 10] (10 = unconditional).

Peak memory: growth of VmHWM during one gradient after a warm-up gradient (TorchScript's
profiling executor optimises the graph on its first calls; both sides warm up), each measurement in a fresh process
(compare_common.PeakMeter); times: median of --reps further gradients; torch threads --threads,
the C++ driver gets the same count (torch's intra-op threads inside the network).

    benchmarks/compare/.venv-diffusers030/bin/python benchmarks/compare/bench_unet_gradient.py
        [--steps 25 50] [--schemes ddim dpm++2m] [--threads 1] [--reps 3] [--torch-only]
    (DIFFGRAD_BUILD=<build dir with benchmarks/unet_gradient>, default build/)
"""
import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import torch.utils.checkpoint

import compare_common as cc

ROOT = pathlib.Path(__file__).resolve().parents[2]
# DIFFGRAD_MODELS_DIR: another folder holding digits_unet_f{32,64}.pt (default data/models)
MODELS = pathlib.Path(os.environ.get("DIFFGRAD_MODELS_DIR", ROOT / "data/models"))
MODEL = MODELS / "digits_unet_f64.pt"
BATCH = 4
LABELS = [0, 3, 7, 10]


def training_table():
    """diffusers' float32 alphas_cumprod of the model's schedule, upcast to float64."""
    try:
        from diffusers import DDPMScheduler

        s = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear")
        return s.alphas_cumprod.to(torch.float64)
    except ImportError:  # the same operations diffusers performs (float32 linspace and cumprod)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def timesteps_of(scheme, n):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if scheme == "ddim":
        s = DDIMScheduler(clip_sample=False)
    elif scheme == "dpm++2m":
        s = DPMSolverMultistepScheduler()
    else:
        raise ValueError(scheme)
    s.set_timesteps(n)
    return [int(k) for k in s.timesteps.tolist()]


def make_nodes(scheme, n):
    abar = training_table()
    ks = timesteps_of(scheme, n)
    nodes = []
    for k in ks:
        a2 = float(abar[k])
        nodes.append((math.sqrt(a2), math.sqrt(1 - a2), 0.5 * math.log(a2) - 0.5 * math.log1p(-a2), k))
    nodes.append((1.0, 0.0, math.inf, -1))  # alpha = 1, sigma = 0 (the data end)
    return nodes


def loop(model, scheme, nodes, x, labels, checkpoint):
    batch = x.shape[0]

    def eps(x, k):
        t = torch.full((batch,), k, dtype=torch.int64)
        if checkpoint:
            # torch 1.13: the non-reentrant variant fails inside TorchScript modules (IndexError in
            # the saved-tensor hooks), so the reentrant one, which needs backward() (not grad())
            return torch.utils.checkpoint.checkpoint(model, x, t, labels)
        return model(x, t, labels)

    n = len(nodes) - 1
    prev_x0, prev_h = None, None
    for i in range(n):
        (a_s, s_s, l_s, k), (a_t, s_t, l_t, _) = nodes[i], nodes[i + 1]
        e = eps(x, k)
        if scheme == "ddim":
            if s_t == 0.0:
                x = x / a_s - (s_s / a_s) * e
            else:
                x = (a_t / a_s) * x - s_t * math.expm1(l_t - l_s) * e
        else:
            x0 = (x - s_s * e) / a_s
            h = l_t - l_s
            c = -a_t * math.expm1(-h)  # alpha_t (1 - e^-h); alpha_t at the data end (h = inf)
            if i == 0 or i == n - 1:  # warm-up and lower_order_final (final sigma = 0)
                x = (s_t / s_s) * x + c * x0
            else:
                d1 = (x0 - prev_x0) * (h / prev_h)  # (1/r0)(x0_i - x0_{i-1}), r0 = h_{i-1}/h_i
                x = (s_t / s_s) * x + c * (x0 + 0.5 * d1)
            prev_x0, prev_h = x0, h
    return x


def child(args):
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model = torch.jit.load(str(MODEL))
    model.eval()
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    tmp = pathlib.Path(args.tmp)
    x_T = cc.read_matrix(tmp / "x.txt").view(BATCH, 1, 8, 8)
    w = cc.read_matrix(tmp / "w.txt").view(BATCH, 1, 8, 8)
    nodes = [tuple(r) for r in cc.read_matrix(tmp / f"nodes_{args.scheme}_{args.n}.txt").tolist()]
    nodes = [(a, s, l, int(k)) for a, s, l, k in nodes]
    labels = torch.tensor(LABELS, dtype=torch.int64)
    checkpoint = args.mode == "checkpoint"

    def gradient():
        for p in params:
            p.grad = None
        x0 = x_T.clone().requires_grad_(True)
        out = loop(model, args.scheme, nodes, x0, labels, checkpoint)
        loss = (w * out).sum()
        loss.backward()
        return out.detach(), x0.grad, torch.cat([p.grad.reshape(-1) for p in params])

    gradient()  # warm-up: TorchScript's profiling executor optimises the graph on the first calls
    meter = cc.PeakMeter()
    out, gx, gp = gradient()
    peak = meter.growth_mib()
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        gradient()
        times.append(time.perf_counter() - start)
    tag = f"{args.scheme}_{args.n}_{args.mode}"
    cc.write_matrix(tmp / f"torch_x0_{tag}.txt", out.view(BATCH, -1))
    cc.write_matrix(tmp / f"torch_gx_{tag}.txt", gx.view(BATCH, -1))
    cc.write_matrix(tmp / f"torch_gp_{tag}.txt", gp.view(1, -1))
    print(json.dumps({"peak_mib": peak, "seconds": statistics.median(times) if times else float("nan")}))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--scheme")
    ap.add_argument("--n", type=int)
    ap.add_argument("--mode")
    ap.add_argument("--tmp")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--schemes", nargs="+", default=["ddim", "dpm++2m"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--torch-only", action="store_true", help="no C++ driver: torch numbers only")
    ap.add_argument("--keep", help="keep the reference files in this folder")
    args = ap.parse_args()
    if args.child:
        return child(args)

    tmp = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="unet_grad_"))
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    cc.write_matrix(tmp / "x.txt", torch.randn(BATCH, 64, generator=gen, dtype=torch.float64))
    cc.write_matrix(tmp / "w.txt", torch.randn(BATCH, 64, generator=gen, dtype=torch.float64))
    cc.write_matrix(tmp / "labels.txt", torch.tensor([LABELS], dtype=torch.float64))
    cc.write_matrix(tmp / "table.txt", training_table().view(1, -1))
    print(f"# {cc.environment()}")
    print(f"# model {MODEL}, batch {BATCH}, labels {LABELS}, L = <w, x_0>, "
          f"files in {tmp}")
    header = ("| scheme | N | torch autograd MiB / s | torch checkpoint MiB / s | diffgrad store_all MiB / s "
              "| diffgrad checkpoint(%d) MiB / s | rel. diff x_0 | grad x_T | grad params | nodes |"
              % args.snapshots)
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for scheme in args.schemes:
        for n in args.steps:
            nodes = make_nodes(scheme, n)
            cc.write_matrix(tmp / f"nodes_{scheme}_{n}.txt", torch.tensor(nodes, dtype=torch.float64))
            res = {}
            for mode in ("autograd", "checkpoint"):
                res[mode] = cc.in_child(__file__, "--scheme", scheme, "--n", n, "--mode", mode,
                                        "--tmp", tmp, "--threads", args.threads, "--reps", args.reps)
            ta = f"{scheme}_{n}_autograd"
            tc = f"{scheme}_{n}_checkpoint"
            ck = max(rel(cc.read_matrix(tmp / f"torch_gp_{tc}.txt"), cc.read_matrix(tmp / f"torch_gp_{ta}.txt")),
                     rel(cc.read_matrix(tmp / f"torch_gx_{tc}.txt"), cc.read_matrix(tmp / f"torch_gx_{ta}.txt")))
            assert ck <= 1e-12, f"torch checkpoint vs plain autograd differ by {ck}"
            row = [scheme, str(n), "%.1f / %.3f" % (res["autograd"]["peak_mib"], res["autograd"]["seconds"]),
                   "%.1f / %.3f" % (res["checkpoint"]["peak_mib"], res["checkpoint"]["seconds"])]
            if args.torch_only:
                row += ["-", "-", "-", "-", "-", "-"]
            else:
                cpp = {}
                for memory in ("store_all", "checkpoint"):
                    tag = f"{scheme}_{n}_{memory}"
                    cpp[memory] = cc.driver(
                        "unet_gradient", "--model", MODEL, "--table", tmp / "table.txt", "--scheme", scheme, "--steps", n,
                        "--x", tmp / "x.txt", "--w", tmp / "w.txt", "--labels", tmp / "labels.txt",
                        "--memory", memory, "--snapshots", args.snapshots, "--threads", args.threads,
                        "--reps", args.reps, "--write-nodes", tmp / f"cpp_nodes_{scheme}_{n}.txt",
                        "--out-x0", tmp / f"cpp_x0_{tag}.txt", "--out-grad", tmp / f"cpp_gx_{tag}.txt",
                        "--out-grad-params", tmp / f"cpp_gp_{tag}.txt")
                ref_nodes = torch.tensor(nodes, dtype=torch.float64)
                cpp_nodes = cc.read_matrix(tmp / f"cpp_nodes_{scheme}_{n}.txt")
                finite = torch.isfinite(ref_nodes)
                node_diff = ((cpp_nodes[finite] - ref_nodes[finite]).abs() /
                             ref_nodes[finite].abs().clamp_min(1e-300)).max().item()
                assert torch.equal(finite, torch.isfinite(cpp_nodes)), "node infinities differ"
                errs = []
                for memory in ("store_all", "checkpoint"):
                    tag = f"{scheme}_{n}_{memory}"
                    errs.append((rel(cc.read_matrix(tmp / f"cpp_x0_{tag}.txt"), cc.read_matrix(tmp / f"torch_x0_{ta}.txt")),
                                 rel(cc.read_matrix(tmp / f"cpp_gx_{tag}.txt"), cc.read_matrix(tmp / f"torch_gx_{ta}.txt")),
                                 rel(cc.read_matrix(tmp / f"cpp_gp_{tag}.txt"), cc.read_matrix(tmp / f"torch_gp_{ta}.txt"))))
                ex0, egx, egp = (max(e[j] for e in errs) for j in range(3))
                row += ["%.1f / %.3f" % (cpp["store_all"]["peak_mib"], cpp["store_all"]["seconds"]),
                        "%.1f / %.3f" % (cpp["checkpoint"]["peak_mib"], cpp["checkpoint"]["seconds"]),
                        "%.1e" % ex0, "%.1e" % egx, "%.1e" % egp, "%.1e" % node_diff]
                if max(ex0, egx, egp) > 1e-10 or node_diff > 1e-14:
                    print("| " + " | ".join(row) + " |")
                    sys.exit(f"FAIL: {scheme} N={n}: agreement above 1e-10 (or nodes above 1e-14)")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
