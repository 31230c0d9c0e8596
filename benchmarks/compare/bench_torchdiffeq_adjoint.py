#!/usr/bin/env python3
"""torchdiffeq's odeint_adjoint on the probability-flow ODE vs diffgrad's gradients: time, peak
memory and gradient error against the exact gradient of the ODE (float64, CPU).

The ODE: the PF-ODE of the VP-linear schedule (beta from 0.1 to 20), t from 1 to 1e-3,
    dx/dt = f(t) x + g^2(t) / (2 sigma(t)) eps(x, t),  f = -beta/2, g^2 = beta,
with eps = diffgrad's MLP 64-128-128-64 (SiLU, fed t) on both sides (torch twin, same weights).
Loss L = <w, x(1e-3)>; gradients with respect to x(1) and all MLP parameters.

Reference ("exact"): diffgrad's exact discrete gradient of rhoRK-DEIS RK4 (order 4) with
--ref-steps steps (default 1000), checked against twice as many (the difference is printed).
Compared:
    torchdiffeq odeint_adjoint, dopri5, rtol = atol in --tols (the continuous adjoint, solved
        adaptively backwards; memory O(1) in the steps)
    torchdiffeq odeint, dopri5 (backprop through the solver's operations)
    diffgrad exact discrete gradients of DDIM, DPM-Solver++ 2M and RK4 at N steps
    diffgrad AdjointDEIS-1 (on the cached DDIM trajectory) and AdjointDEIS-2M (on a cached
        DPM-Solver-2M trajectory): the continuous adjoint, discretised
Peak memory: growth of VmHWM during the first gradient, every method in a fresh process. NFE:
model evaluations forward / backward (torchdiffeq's backward evaluations include the VJPs'
forward passes). Times: medians of --reps further gradients. torch threads: --threads (default 1).

    benchmarks/compare/.venv/bin/python benchmarks/compare/bench_torchdiffeq_adjoint.py
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

BATCH, DIM = 256, 64
B0, B1, T0, T1 = 0.1, 20.0, 1.0, 1e-3


class PfOde(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, t, x):
        self.calls += 1
        t = float(t)
        if not t >= T1:  # beyond t = 1 the formulas extend smoothly; below 1e-3 we never go
            raise ValueError(f"the ODE was evaluated at t = {t} < {T1}")
        beta = B0 + (B1 - B0) * t
        log_alpha = -0.25 * (B1 - B0) * t * t - 0.5 * B0 * t
        sigma = math.sqrt(-math.expm1(2.0 * log_alpha))
        return -0.5 * beta * x + (beta / (2.0 * sigma)) * self.model(x, t)


def torch_child(weights, xfile, wfile, method, tol, reps, gradfile, paramfile, threads):
    import torchdiffeq
    torch.set_num_threads(threads)
    model = cc.MlpTwin.load(weights, torch.float64)
    ode = PfOde(model)
    x_T, w = cc.read_matrix(xfile), cc.read_matrix(wfile)
    ts = torch.tensor([T0, T1], dtype=torch.float64)
    solve = torchdiffeq.odeint_adjoint if method == "adjoint" else torchdiffeq.odeint

    def gradient():
        model.zero_grad(set_to_none=True)
        x0 = x_T.clone().requires_grad_(True)
        ode.calls = 0
        kwargs = {"adjoint_params": tuple(model.parameters())} if method == "adjoint" else {}
        # step_t: steps end exactly at the interval's ends. Without it dopri5 steps past
        # t = 1e-3 and interpolates back, evaluating the ODE down to t < 0 where the schedule
        # is undefined (the adjoint's backward solve may still step past t = 1, which is fine).
        xs = solve(ode, x0, ts, rtol=tol, atol=tol, method="dopri5", options={"step_t": ts},
                   **kwargs)
        forward_calls = ode.calls
        (w * xs[-1]).sum().backward()
        return x0.grad, torch.cat([p.grad.reshape(-1) for p in model.net.parameters()]), \
            forward_calls, ode.calls - forward_calls

    meter = cc.PeakMeter()
    gx, gp, nfe_f, nfe_b = gradient()
    peak = meter.growth_mib()
    cc.write_matrix(gradfile, gx)
    cc.write_matrix(paramfile, gp.view(1, -1))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        gradient()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak, "nfe_f": nfe_f,
                      "nfe_b": nfe_b}))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        torch_child(a[0], a[1], a[2], a[3], float(a[4]), int(a[5]), a[6], a[7], int(a[8]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tols", default="1e-3,1e-5,1e-7")
    p.add_argument("--steps", default="20,50,200")
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # the children set it too; this is for the header line
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="diffgrad_cmp_"))
    weights = tmp / "mlp_t.txt"
    cc.driver("compare_sampler", "--init-weights", weights, "--time-scale", 1.0)
    g = torch.Generator().manual_seed(5)
    xfile, wfile = tmp / "x.txt", tmp / "w.txt"
    cc.write_matrix(xfile, torch.randn(BATCH, DIM, generator=g, dtype=torch.float64))
    cc.write_matrix(wfile, torch.randn(BATCH, DIM, generator=g, dtype=torch.float64))

    def diffgrad(scheme, steps, gradient="exact", reps=args.reps):
        gx, gp = tmp / f"g_{scheme}_{gradient}_{steps}.txt", tmp / f"p_{scheme}_{gradient}_{steps}.txt"
        r = cc.driver("compare_pf_ode", "--weights", weights, "--x", xfile, "--w", wfile, "--steps",
                      steps, "--scheme", scheme, "--gradient", gradient, "--reps", reps,
                      "--out-grad", gx, "--out-grad-params", gp)
        return r, cc.read_matrix(gx), cc.read_matrix(gp)

    _, ref_x, ref_p = diffgrad("rk4", args.ref_steps, reps=0)
    _, ref2_x, ref2_p = diffgrad("rk4", 2 * args.ref_steps, reps=0)

    print(f"# PF-ODE gradients: torchdiffeq odeint_adjoint vs diffgrad (float64, batch {BATCH}, "
          f"d = {DIM}, MLP 64-128-128-64, VP-linear, t from 1 to 1e-3)\n")
    print(f"Environment: {cc.environment()}\n")
    print(f"Reference: exact discrete gradient of RK4 with {args.ref_steps} steps; against "
          f"{2 * args.ref_steps} steps it differs by {rel(ref_x, ref2_x):.1e} (dL/dx_T) and "
          f"{rel(ref_p, ref2_p):.1e} (dL/dtheta) relative.\n")
    print("| method | settings | NFE fwd / bwd (VJPs) | time s | peak RSS growth MiB | rel. error "
          "dL/dx_T | rel. error dL/dtheta |")
    print("|---|---|---|---|---|---|---|")
    for method, tols in (("adjoint", args.tols.split(",")), ("direct", ["1e-5"])):
        for tol in tols:
            tg, tp = tmp / "tg.txt", tmp / "tp.txt"
            t = cc.in_child(pathlib.Path(__file__), weights, xfile, wfile, method, tol, args.reps,
                            tg, tp, args.threads)
            name = "torchdiffeq odeint_adjoint" if method == "adjoint" else \
                "torchdiffeq odeint (backprop)"
            print(f"| {name} | dopri5, rtol = atol = {tol} | {t['nfe_f']} / {t['nfe_b']} | "
                  f"{t['seconds']:.3f} | {t['peak_mib']:.1f} | {rel(cc.read_matrix(tg), ref_x):.1e} "
                  f"| {rel(cc.read_matrix(tp), ref_p):.1e} |", flush=True)
    rows = [("ddim", "exact", "diffgrad exact gradient, DDIM"),
            ("dpm++2m", "exact", "diffgrad exact gradient, DPM-Solver++ 2M"),
            ("rk4", "exact", "diffgrad exact gradient, RK4 (rhoRK-DEIS)"),
            ("ddim", "adjoint1", "diffgrad AdjointDEIS-1 (cached DDIM trajectory)"),
            ("ddim", "adjoint2m", "diffgrad AdjointDEIS-2M (cached DPM-Solver-2M trajectory)")]
    for scheme, gradient, name in rows:
        for steps in [int(s) for s in args.steps.split(",")]:
            r, gx, gp = diffgrad(scheme, steps, gradient)
            print(f"| {name} | N = {steps} | {r['model_evals']:.0f} / {r['vjps']:.0f} | "
                  f"{r['seconds']:.3f} | {r['peak_mib']:.1f} | {rel(gx, ref_x):.1e} | "
                  f"{rel(gp, ref_p):.1e} |", flush=True)
    print(f"\nLoad average after the run: {cc.load_average()}")


if __name__ == "__main__":
    main()
