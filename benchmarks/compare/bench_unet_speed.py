#!/usr/bin/env python3
"""Sampling speed with the learned digits UNet (data/models/digits_unet_f{32,64}.pt): diffusers'
scheduler loop around the traced network in Python vs diffgrad + the LibTorch adapter around the
same file in C++ (build/benchmarks/unet_speed), per step, for several batch sizes and thread
counts, in one run.

  Python: scheduler.set_timesteps(N); for t in scheduler.timesteps:
              eps = net(x, t.expand(B), labels); x = scheduler.step(eps, t, x).prev_sample
          with DDIMScheduler(clip_sample=False) and DPMSolverMultistepScheduler() (dpmsolver++ 2M),
          both on the model's training table (linear betas 1e-4..2e-2, 1000 steps)
  C++:    diffgrad::sample(compat setup of the same config, EigenBackend, TorchNoiseModel)
Both sides use the same LibTorch build (Debian's libtorch 1.13, which python3-torch wraps: the
same libtorch_cpu.so) with torch.set_num_threads / at::set_num_threads = --threads.
Reported: median over --reps runs of (loop time / N), in ms per step, and the network alone
(median ms per call, Python side) to show what the loop adds; ratio = diffusers / diffgrad.
Labels: b % 10 for row b. The last column compares the two samples (max |x_cpp - x_py| /
max |x_py|): both sides do the same work (float32: diffusers' float32 scheduler arithmetic vs
diffgrad's double coefficients, so ~1e-6, not 0).

    benchmarks/compare/.venv-diffusers030/bin/python benchmarks/compare/bench_unet_speed.py \
        [--dtype float32] [--steps 25] [--batches 1 16 128] [--threads 1 2] [--reps 5] [--no-cpp]
    (DIFFGRAD_BUILD=<build dir with benchmarks/unet_speed>, default build/)
"""
import argparse
import os
import pathlib
import re
import statistics
import tempfile
import time

import torch

import compare_common as cc

ROOT = pathlib.Path(__file__).resolve().parents[2]
# DIFFGRAD_MODELS_DIR: another folder holding digits_unet_f{32,64}.pt (default data/models)
MODELS = pathlib.Path(os.environ.get("DIFFGRAD_MODELS_DIR", ROOT / "data/models"))


def scheduler(name):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if name == "ddim":
        return DDIMScheduler(clip_sample=False, **common)
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler(**common)
    raise ValueError(name)


def python_loop(net, sched, steps, x_T, labels):
    sched.set_timesteps(steps)
    x = x_T.clone()
    batch = x.shape[0]
    with torch.no_grad():
        for t in sched.timesteps:
            eps = net(x, t.expand(batch), labels)
            x = sched.step(eps, t, x).prev_sample
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--schedulers", nargs="+", default=["ddim", "dpm++2m"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cpp", action="store_true", help="Python side only")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    model = MODELS / ("digits_unet_%s.pt" % ("f32" if dtype == torch.float32 else "f64"))
    net = torch.jit.load(str(model)).eval()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="unet_speed_"))
    cc.write_matrix(tmp / "table.txt", scheduler("ddim").alphas_cumprod.to(torch.float64).view(1, -1))
    print(f"# {cc.environment()}")
    config = torch.__config__.show()
    keys = ("BLAS_INFO", "LAPACK_INFO", "USE_MKLDNN", "USE_OPENMP", "TORCH_VERSION")
    found = {k: re.search(k + r"=([^,\s]+)", config) for k in keys}
    print("# torch build: " + ", ".join(f"{k}={m.group(1)}" for k, m in found.items() if m)
          + "; " + "; ".join(l.strip() for l in torch.__config__.parallel_info().splitlines()[1:3]))
    libblas = pathlib.Path("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    if libblas.exists():  # Debian: BLAS_INFO=generic is whatever libblas.so.3 alternative is set
        print(f"# libblas.so.3 -> {os.path.realpath(libblas)}; torch library: "
              f"{os.path.realpath(pathlib.Path(torch.__file__).parent / 'lib' / 'libtorch_cpu.so')}")
    print(f"# model {model}, {args.steps} steps, medians of {args.reps} runs, ms per step")
    print("| threads | batch | scheduler | diffusers loop | network alone | diffgrad + adapter | ratio "
          "| samples' max rel. diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            x_T = torch.randn(batch, 1, 8, 8, generator=gen).to(dtype)
            labels = torch.arange(batch, dtype=torch.int64) % 10
            cc.write_matrix(tmp / f"x_{batch}.txt", x_T.view(batch, -1))
            # the network alone (the same calls the loop makes, no scheduler)
            with torch.no_grad():
                t = torch.full((batch,), 500, dtype=torch.int64)
                for _ in range(3):
                    net(x_T, t, labels)
                calls = []
                for _ in range(max(args.reps, 5) * 5):
                    start = time.perf_counter()
                    net(x_T, t, labels)
                    calls.append(time.perf_counter() - start)
            net_ms = 1e3 * statistics.median(calls)
            for name in args.schedulers:
                sched = scheduler(name)
                x_py = python_loop(net, sched, args.steps, x_T, labels)  # warm-up
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    python_loop(net, sched, args.steps, x_T, labels)
                    times.append((time.perf_counter() - start) / args.steps)
                py_ms = 1e3 * statistics.median(times)
                cpp_ms, diff = None, None
                if not args.no_cpp:
                    r = cc.driver("unet_speed", "--model", model, "--table", tmp / "table.txt",
                                  "--scheme", name, "--steps", args.steps, "--x", tmp / f"x_{batch}.txt",
                                  "--threads", threads, "--reps", args.reps, "--dtype", args.dtype,
                                  "--out-x", tmp / "x_cpp.txt")
                    cpp_ms = 1e3 * r["seconds_per_step"]
                    x_cpp = cc.read_matrix(tmp / "x_cpp.txt")
                    ref = x_py.to(torch.float64).view(batch, -1)
                    diff = ((x_cpp - ref).abs().max() / ref.abs().max()).item()
                print(f"| {threads} | {batch} | {name} | {py_ms:.3f} | {net_ms:.3f} | "
                      + (f"{cpp_ms:.3f} | {py_ms / cpp_ms:.2f} | {diff:.1e} |" if cpp_ms else "- | - | - |"),
                      flush=True)


if __name__ == "__main__":
    main()
