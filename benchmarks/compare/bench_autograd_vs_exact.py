#!/usr/bin/env python3
"""torch autograd through N DDIM steps vs diffgrad's exact gradient: time, peak memory and
gradient agreement (float64, CPU).

Same model (diffgrad's MLP 64-128-128-64, SiLU, loaded into its torch twin), same nodes (VP-linear
schedule, uniform log-SNR grid from t = 1 to 1e-3, written by the C++ driver), same loss
L = <w, x_0>, gradients with respect to x_T and all MLP parameters.

    torch:     x = x_T (requires_grad); N times: x = c_x x + c_e model(x, t_i);  L.backward()
               with c_x = alpha_t/alpha_s, c_e = -sigma_t expm1(lambda_t - lambda_s); also with
               torch.utils.checkpoint (non-reentrant) around every step, and around segments of
               ceil(sqrt(N)) steps: torch's own answers to the memory of a long graph
    diffgrad:  build/benchmarks/compare_gradient: gradient(Ddim(), ...) with wrt_params, memory
               store_all (every state) or checkpoint (k stored states, binomial; --snapshots
               lists the k, "sqrt" meaning ceil(sqrt(N)), the memory shape of torch's
               sqrt(N)-segment checkpointing)

Peak memory: growth of the peak resident size (VmHWM, reset through /proc/self/clear_refs)
during the first gradient, each measurement in a fresh process; it includes everything the
gradient allocates (torch: the autograd graph; diffgrad: the workspace). Times: medians of
--reps further gradients in the same process. Threads: --threads (default 1) sets torch's
intra-op threads and diffgrad's backend and MLP threads alike.

    benchmarks/compare/.venv/bin/python benchmarks/compare/bench_autograd_vs_exact.py
"""
import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import pathlib

import torch

import compare_common as cc

BATCH, DIM = 512, 64


def torch_child(weights, xfile, wfile, nodefile, reps, gradfile, paramfile, threads, mode):
    torch.set_num_threads(threads)
    model = cc.MlpTwin.load(weights, torch.float64)
    x_T = cc.read_matrix(xfile)
    w = cc.read_matrix(wfile)
    nodes = cc.read_matrix(nodefile).tolist()  # alpha sigma lambda model_t
    coeffs = []
    for s, t in zip(nodes[:-1], nodes[1:]):
        coeffs.append((t[0] / s[0], -t[1] * math.expm1(t[2] - s[2]), s[3]))

    def run_steps(x, first, last):
        for c_x, c_e, model_t in coeffs[first:last]:
            x = c_x * x + c_e * model(x, model_t)
        return x

    # Steps per torch.utils.checkpoint segment (0: no checkpointing).
    segment = {"plain": 0, "ckpt_step": 1,
               "ckpt_sqrt": math.ceil(math.sqrt(len(coeffs)))}[mode]

    def gradient(x_start=x_T):
        model.zero_grad(set_to_none=True)
        x0 = x_start.clone().requires_grad_(True)
        if segment == 0:
            x = run_steps(x0, 0, len(coeffs))
        else:
            x = x0
            for first in range(0, len(coeffs), segment):
                x = torch.utils.checkpoint.checkpoint(
                    run_steps, x, first, min(first + segment, len(coeffs)), use_reentrant=False)
        loss = (w * x).sum()
        loss.backward()
        return x0.grad, torch.cat([p.grad.reshape(-1) for p in model.net.parameters()])

    # Warm-up on one row, outside the measurement: the first checkpointed call loads code
    # (torch.utils.checkpoint's machinery) whose memory is not the gradient's.
    gradient(x_T[:1])
    meter = cc.PeakMeter()
    gx, gp = gradient()
    peak = meter.growth_mib()
    cc.write_matrix(gradfile, gx)
    cc.write_matrix(paramfile, gp.view(1, -1))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        gradient()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak}))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        torch_child(a[0], a[1], a[2], a[3], int(a[4]), a[5], a[6], int(a[7]), a[8])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="10,25,50,100")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--snapshots", default="5,sqrt",
                   help="diffgrad checkpoint rows: stored states per row ('sqrt': ceil(sqrt(N)))")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's intra-op threads and diffgrad's backend threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # the children set it too; this is for the header line
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="diffgrad_cmp_"))
    weights = tmp / "mlp_t.txt"
    cc.driver("compare_sampler", "--init-weights", weights, "--time-scale", 1.0)
    g = torch.Generator().manual_seed(11)
    xfile, wfile = tmp / "x.txt", tmp / "w.txt"
    cc.write_matrix(xfile, torch.randn(BATCH, DIM, generator=g, dtype=torch.float64))
    cc.write_matrix(wfile, torch.randn(BATCH, DIM, generator=g, dtype=torch.float64))

    print(f"# torch autograd through N DDIM steps vs diffgrad's exact gradient (float64, batch "
          f"{BATCH}, d = {DIM}, MLP 64-128-128-64; gradients w.r.t. x_T and the 34,624 "
          "parameters)\n")
    print(f"Environment: {cc.environment()}\n")
    print("| N | method | time s | time vs torch | peak RSS growth MiB | torch peak / this peak | "
          "stored states | rel. error dL/dx_T | rel. error dL/dtheta |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps in [int(s) for s in args.steps.split(",")]:
        nodefile = tmp / f"nodes{steps}.txt"
        cc.driver("compare_gradient", "--write-nodes", nodefile, "--steps", steps)
        tg, tp = tmp / "tg.txt", tmp / "tp.txt"
        t = cc.in_child(pathlib.Path(__file__), weights, xfile, wfile, nodefile, args.reps, tg, tp,
                        args.threads, "plain")
        ref_x, ref_p = cc.read_matrix(tg), cc.read_matrix(tp)
        print(f"| {steps} | torch autograd | {t['seconds']:.3f} | 1.00 | {t['peak_mib']:.1f} | 1.0 "
              f"| (graph) | - | - |", flush=True)
        for mode, name in (("ckpt_step", "torch autograd, checkpoint every step"),
                           ("ckpt_sqrt", f"torch autograd, checkpoint "
                                         f"{math.ceil(math.sqrt(steps))}-step segments")):
            cg, cp = tmp / "cg.txt", tmp / "cp.txt"
            c = cc.in_child(pathlib.Path(__file__), weights, xfile, wfile, nodefile, args.reps,
                            cg, cp, args.threads, mode)
            print(f"| {steps} | {name} | {c['seconds']:.3f} | {c['seconds'] / t['seconds']:.2f} | "
                  f"{c['peak_mib']:.1f} | {t['peak_mib'] / c['peak_mib']:.1f} | (segments) | "
                  f"{rel(cc.read_matrix(cg), ref_x):.1e} | {rel(cc.read_matrix(cp), ref_p):.1e} |",
                  flush=True)
        snapshot_counts = []
        for k in args.snapshots.split(","):
            k = math.ceil(math.sqrt(steps)) if k == "sqrt" else int(k)
            if k not in snapshot_counts and k < steps:
                snapshot_counts.append(k)
        for memory, snapshots in [("store_all", 0)] + [("checkpoint", k) for k in snapshot_counts]:
            dg, dp = tmp / "dg.txt", tmp / "dp.txt"
            r = cc.driver("compare_gradient", "--weights", weights, "--x", xfile, "--w", wfile,
                          "--steps", steps, "--memory", memory, "--snapshots", max(snapshots, 1),
                          "--reps", args.reps, "--out-grad", dg, "--out-grad-params", dp,
                          "--threads", args.threads)
            name = "diffgrad exact, store all" if memory == "store_all" else \
                f"diffgrad exact, checkpoint ({snapshots})"
            print(f"| {steps} | {name} | {r['seconds']:.3f} | {r['seconds'] / t['seconds']:.2f} | "
                  f"{r['peak_mib']:.1f} | {t['peak_mib'] / r['peak_mib']:.1f} | "
                  f"{r['stored_states']:.0f} | {rel(cc.read_matrix(dg), ref_x):.1e} | "
                  f"{rel(cc.read_matrix(dp), ref_p):.1e} |", flush=True)
    print(f"\nLoad average after the run: {cc.load_average()}")


if __name__ == "__main__":
    main()
