#!/usr/bin/env python3
"""diffusers' scheduler loop vs diffgrad on the CPU: time per step and output agreement.

Same model on both sides: diffgrad's MLP (64-128-128-64, SiLU, fed the integer timestep / 1000),
initialised by the C++ driver and loaded into its torch twin (compare_common.MlpTwin). Same
schedule: diffusers' DDIMScheduler (clip_sample=False, otherwise its defaults: linear betas
1e-4..0.02, 1000 training steps, "leading" spacing, set_alpha_to_one), and on the diffgrad side
compat::ddim_setup on the scheduler's own alphas_cumprod table. For each dtype and batch size:

    diffusers:  scheduler.set_timesteps(N); for t in timesteps: eps = model(x, t);
                x = scheduler.step(eps, t, x).prev_sample          (torch.no_grad)
    diffgrad:   build/benchmarks/compare_sampler (diffgrad::sample, workspace built per call)

    plain torch: the same DDIM update written as a user would without diffusers: coefficients
                precomputed, x.mul_(c_x).add_(eps, alpha=c_e) in place (torch.no_grad); the
                fastest torch loop around the same model, so it isolates the model's own speed

model "mlp" times the whole loop; model "none" returns one constant tensor (diffgrad: a no-op
model), so only the schedulers' own per-step work is timed. Times are medians of --reps runs
after one warm-up, per step. In float64 the scheduler's alphas_cumprod (float32 values) is
upcast so diffusers computes in float64 (as gen_diffusers_reference.py does); float32 runs are
diffusers as users run it. Threads: --threads (default 1) for torch's intra-op threads and for
diffgrad's backend threads alike.

    benchmarks/compare/.venv/bin/python benchmarks/compare/bench_diffusers_loop.py
"""
import argparse
import math
import statistics
import tempfile
import time
import pathlib

import torch
from diffusers import DDIMScheduler

import compare_common as cc


def diffusers_loop(model, scheduler, x_T, steps, dtype, reps):
    eps_const = torch.zeros_like(x_T, dtype=dtype)
    times, out = [], None
    with torch.no_grad():
        for r in range(reps + 1):  # run 0 is the warm-up
            start = time.perf_counter()
            scheduler.set_timesteps(steps)
            x = x_T.to(dtype)
            for t in scheduler.timesteps:
                eps = model(x, float(t)) if model is not None else eps_const
                x = scheduler.step(eps, t, x).prev_sample
            if r > 0:
                times.append(time.perf_counter() - start)
            out = x
    return statistics.median(times) / steps, out


def plain_torch_loop(model, scheduler, x_T, steps, dtype, reps):
    """DDIM (eta = 0) with host-precomputed coefficients and an in-place update."""
    scheduler.set_timesteps(steps)
    a = scheduler.alphas_cumprod.to(torch.float64)
    stride = scheduler.config.num_train_timesteps // steps
    plan = []
    for t in scheduler.timesteps.tolist():
        a_t = a[t].item()
        a_prev = a[t - stride].item() if t - stride >= 0 else float(scheduler.final_alpha_cumprod)
        c_x = math.sqrt(a_prev / a_t)
        c_e = math.sqrt(1.0 - a_prev) - math.sqrt(a_prev) * math.sqrt(1.0 - a_t) / math.sqrt(a_t)
        plan.append((float(t), c_x, c_e))
    times, out = [], None
    with torch.no_grad():
        for r in range(reps + 1):  # run 0 is the warm-up
            start = time.perf_counter()
            x = x_T.to(dtype, copy=True)  # the loop updates x in place
            for t, c_x, c_e in plan:
                eps = model(x, t)
                x.mul_(c_x).add_(eps, alpha=c_e)
            if r > 0:
                times.append(time.perf_counter() - start)
            out = x
    return statistics.median(times) / steps, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", default="1,16,256,4096,16384")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", default="float32,float64")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="diffgrad_cmp_"))
    weights = tmp / "mlp_timestep.txt"
    cc.driver("compare_sampler", "--init-weights", weights, "--time-scale", 0.001)

    print(f"# diffusers DDIMScheduler loop vs diffgrad, {args.steps} steps, MLP 64-128-128-64\n")
    print(f"Environment: {cc.environment()}\n")
    print("| dtype | B | B*d | model | diffusers ms/step | plain torch ms/step | diffgrad ms/step | "
          "diffusers / diffgrad | plain torch / diffgrad | max abs diff / max abs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        scheduler = DDIMScheduler(clip_sample=False)
        alphas = tmp / "alphas.txt"
        cc.write_matrix(alphas, scheduler.alphas_cumprod.to(torch.float64).view(1, -1))
        if dtype == torch.float64:  # float64 arithmetic on the float32 table values
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
            scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(torch.float64)
        model = cc.MlpTwin.load(weights, dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            g = torch.Generator().manual_seed(batch)
            x_T = torch.randn(batch, 64, generator=g, dtype=torch.float64)
            if dtype == torch.float32:
                x_T = x_T.to(torch.float32).to(torch.float64)  # both sides start from the same x_T
            xfile, outfile = tmp / "x.txt", tmp / "out.txt"
            cc.write_matrix(xfile, x_T)
            reps = args.reps if batch < 16384 else max(2, args.reps // 2)
            for kind in ("mlp", "none"):
                py_step, py_out = diffusers_loop(model if kind == "mlp" else None, scheduler, x_T,
                                                 args.steps, dtype, reps)
                plain = "-"
                if kind == "mlp":
                    plain_step, plain_out = plain_torch_loop(model, scheduler, x_T, args.steps,
                                                             dtype, reps)
                    plain = plain_step
                r = cc.driver("compare_sampler", "--weights", weights, "--alphas", alphas, "--x",
                              xfile, "--steps", args.steps, "--dtype",
                              "f32" if dtype == torch.float32 else "f64", "--reps", reps, "--model",
                              kind, "--out", outfile, "--threads", args.threads)
                agree = "-"
                if kind == "mlp":
                    cpp_out = cc.read_matrix(outfile)
                    ref = py_out.to(torch.float64)
                    agree = f"{((cpp_out - ref).abs().max() / ref.abs().max()).item():.1e}"
                    plain_diff = ((plain_out.to(torch.float64) - ref).abs().max() /
                                  ref.abs().max()).item()
                    agree += f" (plain torch vs diffusers {plain_diff:.1e})"
                cpp_step = r["seconds_per_step"]
                plain_ms = f"{1e3 * plain:.4f}" if plain != "-" else "-"
                plain_ratio = f"{plain / cpp_step:.2f}" if plain != "-" else "-"
                print(f"| {dtype_name} | {batch} | {batch * 64} | {kind} | {1e3 * py_step:.4f} | "
                      f"{plain_ms} | {1e3 * cpp_step:.4f} | {py_step / cpp_step:.1f} | "
                      f"{plain_ratio} | {agree} |", flush=True)
    print(f"\nLoad average after the run: {cc.load_average()}")


if __name__ == "__main__":
    main()
