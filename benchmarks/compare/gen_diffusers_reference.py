#!/usr/bin/env python3
"""Runs diffusers' DDIM, DPM-Solver (multistep, singlestep) and DEIS schedulers in float64 on a
fixed nonlinear test model and writes their trajectories to tests/data/compat/diffusers_*.txt.

diffgrad's tests (tests/test_compat_diffusers.cpp) replay every case with the same model written
in C++ (tests/compat_test_model.hpp) and compare to <= 1e-6 relative. See README.md beside this
file for how to regenerate, and docs/compat_diffusers.md for what is compared.

Making diffusers compute in float64 (it builds its tables in float32 and casts in places):
  * betas / alphas_cumprod are built by torch.linspace + cumprod in float32. We keep that table
    (it *is* the model's noise schedule), upcast it to float64 and write it to the reference file,
    so the C++ side uses bit-identical alphas_cumprod values.
  * alpha_t, sigma_t, lambda_t (used by lambda_min_clipped) are recomputed in float64 from it.
  * DPMSolverMultistep / DPMSolverSinglestep / DEIS set_timesteps end with
    `sigmas.astype(np.float32)`: we run diffusers' own set_timesteps source with that single
    cast changed to float64 (patched by exact string replacement, asserted to match).
  * DPMSolverMultistep.step does `sample = sample.to(torch.float32)` and draws/casts the SDE noise
    to float32: same treatment, float64 instead.
  * DDIM: `final_alpha_cumprod` (a float32 scalar tensor) is upcast; nothing else is float32.
  * The model is called with the integer timestep converted to a Python float: torch would
    otherwise divide the int64 timestep tensor in the default dtype (float32).
Everything else is diffusers' unmodified code.
"""
import argparse
import inspect
import os
import sys
import textwrap

import warnings

import numpy as np
import torch

torch.set_grad_enabled(False)
warnings.filterwarnings("ignore", category=FutureWarning)  # algorithm_type "dpmsolver" deprecation

# --------------------------------------------------------------------------------------------
# The test model. Written identically in tests/compat_test_model.hpp:
#   eps(x, m) = tanh(A x + b (m / 1000) + c) + 0.1 x      per sample (row) x in R^5,
# m = the model time (diffusers: the integer timestep; official DPM-Solver: 1000 (t - 1/N)).
# Nonlinear in x (tanh) and in the time (through tanh as well).
# --------------------------------------------------------------------------------------------
DIM = 5
BATCH = 3
MODEL_A = [
    [0.55, -0.30, 0.20, 0.10, -0.15],
    [0.12, 0.45, -0.25, 0.30, 0.05],
    [-0.20, 0.10, 0.60, -0.10, 0.25],
    [0.30, 0.20, -0.15, 0.50, -0.05],
    [-0.10, 0.25, 0.05, -0.20, 0.40],
]
MODEL_B = [0.8, -0.5, 0.3, 1.2, -0.9]
MODEL_C = [0.1, -0.2, 0.05, 0.0, 0.15]
_A = torch.tensor(MODEL_A, dtype=torch.float64)
_B = torch.tensor(MODEL_B, dtype=torch.float64)
_C = torch.tensor(MODEL_C, dtype=torch.float64)


def test_model(x, model_time):
    """x: (batch, DIM) float64; model_time: Python float or float64 tensor of shape () / (batch,)."""
    m = torch.as_tensor(model_time, dtype=torch.float64)
    if m.dim() == 1:
        m = m[:, None]
    return torch.tanh(x @ _A.T + _B * (m / 1000.0) + _C) + 0.1 * x


def initial_noise(seed=20240611):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)


def step_noises(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Reference file writer: whitespace-separated tokens, one record per line.
#   table <name> <n> v...            a named vector
#   state <name> <batch> <dim> v...  a named B x d matrix (row-major)
#   case <name> / param <key> <value> / timesteps <n> k... / noise <steps> <B> <d> v... /
#   states <count> <B> <d> v... (the sample after every scheduler.step call) / end
# --------------------------------------------------------------------------------------------
def fmt(v):
    return repr(float(v))


class RefWriter:
    keep_last = None  # write only the last keep_last states of a case (param first_state_step)

    def __init__(self, path, header_lines):
        self.f = open(path, "w")
        for line in header_lines:
            self.f.write("# " + line + "\n")

    def table(self, name, values):
        values = [float(v) for v in values]
        self.f.write(f"table {name} {len(values)} " + " ".join(fmt(v) for v in values) + "\n")

    def state(self, name, x):
        b, d = x.shape
        self.f.write(f"state {name} {b} {d} " + " ".join(fmt(v) for v in x.reshape(-1).tolist()) + "\n")

    def case(self, name, params, timesteps, states, noises=None):
        w = self.f.write
        w(f"case {name}\n")
        if self.keep_last is not None and len(states) > self.keep_last:
            params = dict(params, first_state_step=len(states) - self.keep_last)
            states = states[-self.keep_last:]
        for k, v in params.items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            w(f"param {k} {v}\n")
        ts = [int(t) for t in timesteps]
        w(f"timesteps {len(ts)} " + " ".join(str(t) for t in ts) + "\n")
        if noises is not None:
            w(f"noise {len(noises)} {BATCH} {DIM} "
              + " ".join(fmt(v) for n in noises for v in n.reshape(-1).tolist()) + "\n")
        w(f"states {len(states)} {BATCH} {DIM} "
          + " ".join(fmt(v) for s in states for v in s.reshape(-1).tolist()) + "\n")
        w("end\n")

    def close(self):
        self.f.close()


# --------------------------------------------------------------------------------------------
# float64 patches (see the module docstring).
# --------------------------------------------------------------------------------------------
def patched_method(cls, name, replacements):
    """cls.<name> recompiled from diffusers' own source with exact string replacements."""
    src = textwrap.dedent(inspect.getsource(getattr(cls, name)))
    for old, new, count in replacements:
        found = src.count(old)
        if found != count:
            raise RuntimeError(f"{cls.__name__}.{name}: expected {count} x {old!r}, found {found} "
                               "(diffusers changed: re-check the float64 patches)")
        src = src.replace(old, new)
    module = sys.modules[cls.__module__]
    namespace = dict(module.__dict__)
    exec(compile(src, f"<float64 patch of {cls.__name__}.{name}>", "exec"), namespace)
    return namespace[name]


def float64_scheduler_class(cls):
    patches = {}
    if "sigmas = np.concatenate" in inspect.getsource(cls.set_timesteps):
        src = inspect.getsource(cls.set_timesteps)
        patches["set_timesteps"] = patched_method(
            cls, "set_timesteps", [(".astype(np.float32)", ".astype(np.float64)",
                                    src.count(".astype(np.float32)"))])
    step_src = inspect.getsource(cls.step)
    if "sample = sample.to(torch.float32)" in step_src:
        patches["step"] = patched_method(cls, "step", [
            ("sample = sample.to(torch.float32)", "sample = sample.to(torch.float64)", 1),
            ("dtype=torch.float32", "dtype=torch.float64", step_src.count("dtype=torch.float32")),
        ])
    return type(cls.__name__ + "Float64", (cls,), patches)


def upcast_tables(s):
    """Upcasts the float32 tables built in __init__ (before set_timesteps)."""
    s.alphas_cumprod = s.alphas_cumprod.to(torch.float64)
    if hasattr(s, "alpha_t"):
        s.alpha_t = torch.sqrt(s.alphas_cumprod)
        s.sigma_t = torch.sqrt(1 - s.alphas_cumprod)
        s.lambda_t = torch.log(s.alpha_t) - torch.log(s.sigma_t)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = s.final_alpha_cumprod.to(torch.float64)


def check_float64(s):
    for name in ("alphas_cumprod", "sigmas", "final_alpha_cumprod"):
        v = getattr(s, name, None)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert v.dtype == torch.float64, f"{name} is {v.dtype}"


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------
import diffusers.utils.logging  # noqa: E402

# Silences "Changing scheduler ... lower_order_final set to True": the effective value is written.
diffusers.utils.logging.set_verbosity_error()
from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler)

DDIM64 = float64_scheduler_class(DDIMScheduler)
MULTI64 = float64_scheduler_class(DPMSolverMultistepScheduler)
SINGLE64 = float64_scheduler_class(DPMSolverSinglestepScheduler)
DEIS64 = float64_scheduler_class(DEISMultistepScheduler)

# Config keys written per family (the full effective value, never relying on defaults).
DDIM_KEYS = ["num_train_timesteps", "beta_schedule", "timestep_spacing", "steps_offset",
             "set_alpha_to_one", "prediction_type", "clip_sample", "clip_sample_range",
             "thresholding", "dynamic_thresholding_ratio", "sample_max_value"]
DPM_KEYS = ["num_train_timesteps", "beta_schedule", "solver_order", "prediction_type",
            "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "algorithm_type",
            "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
            "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped", "timestep_spacing",
            "steps_offset"]
SINGLE_KEYS = ["num_train_timesteps", "beta_schedule", "solver_order", "prediction_type",
               "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
               "algorithm_type", "solver_type", "lower_order_final", "use_karras_sigmas",
               "final_sigmas_type", "lambda_min_clipped"]
DEIS_KEYS = ["num_train_timesteps", "beta_schedule", "solver_order", "prediction_type",
             "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "algorithm_type",
             "solver_type", "lower_order_final", "use_karras_sigmas", "timestep_spacing",
             "steps_offset"]


def params_of(s, keys, extra):
    p = {"scheduler": extra.pop("scheduler")}
    for k in keys:
        if k in s.config:
            p[k] = s.config[k]
    p.update(extra)
    return p


def run_loop(s, x, step_kwargs=None, noises=None, start=0):
    """The sample after every scheduler.step from timesteps[start] on. States from the first
    non-finite one on (diffusers' NaN cells, docs/compat_diffusers.md) are not returned: the
    caller records how many steps were finite (the C++ reader takes finite numbers only)."""
    # diffusers' thresholding reshapes to (batch, channels, ...): run on (B, 1, d) "images".
    x = x.reshape(BATCH, 1, DIM)
    states = []
    for i, t in enumerate(s.timesteps[start:]):
        eps = test_model(x.reshape(BATCH, DIM), float(t)).reshape(BATCH, 1, DIM)
        kw = dict(step_kwargs or {})
        if noises is not None:
            kw["variance_noise"] = noises[i].reshape(BATCH, 1, DIM)
        x = s.step(eps, t, x, **kw).prev_sample
        assert x.dtype == torch.float64
        if not torch.isfinite(x).all():
            break
        states.append(x.reshape(BATCH, DIM).clone())
    return states


def run_ddim(w, x_T, name, steps, eta=0.0, use_clipped_model_output=False, noise_seed=None,
             **config):
    config.setdefault("clip_sample", False)
    s = DDIM64(**config)
    upcast_tables(s)
    s.set_timesteps(steps)
    check_float64(s)
    noises = step_noises(len(s.timesteps), noise_seed) if eta > 0 else None
    states = run_loop(s, x_T.clone(), dict(eta=eta, use_clipped_model_output=use_clipped_model_output),
                      noises)
    params = params_of(s, DDIM_KEYS, dict(scheduler="ddim", num_inference_steps=steps, eta=eta,
                                          use_clipped_model_output=use_clipped_model_output))
    w.case(name, params, s.timesteps, states, noises)


def run_multistep(w, x_T, name, steps, noise_seed=None, **config):
    s = MULTI64(**config)
    upcast_tables(s)
    s.set_timesteps(steps)
    check_float64(s)
    noises = (step_noises(len(s.timesteps), noise_seed)
              if s.config.algorithm_type.startswith("sde") else None)
    states = run_loop(s, x_T.clone(), None, noises)
    params = params_of(s, DPM_KEYS, dict(scheduler="dpmsolver_multistep",
                                         num_inference_steps=steps))
    if len(states) < len(s.timesteps):
        params["diffusers_finite_steps"] = len(states)  # diffusers' later steps are NaN
    w.case(name, params, s.timesteps, states, noises)
    return s


def run_singlestep(w, x_T, name, steps, **config):
    s = SINGLE64(**config)
    upcast_tables(s)
    s.set_timesteps(steps)
    check_float64(s)
    states = run_loop(s, x_T.clone())
    params = params_of(s, SINGLE_KEYS, dict(scheduler="dpmsolver_singlestep",
                                            num_inference_steps=steps))
    params["order_list"] = ",".join(str(o) for o in s.order_list)
    if len(states) < len(s.timesteps):
        params["diffusers_finite_steps"] = len(states)
    w.case(name, params, s.timesteps, states)


def run_deis(w, x_T, name, steps, **config):
    s = DEIS64(**config)
    upcast_tables(s)
    s.set_timesteps(steps)
    check_float64(s)
    states = run_loop(s, x_T.clone())
    params = params_of(s, DEIS_KEYS, dict(scheduler="deis_multistep", num_inference_steps=steps))
    w.case(name, params, s.timesteps, states)


def header(what):
    import diffusers
    return [f"diffgrad compat reference: {what}",
            "generated by benchmarks/compare/gen_diffusers_reference.py (see benchmarks/compare/README.md)",
            f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}; float64",
            "model: eps(x, m) = tanh(A x + b m/1000 + c) + 0.1 x (tests/compat_test_model.hpp)"]


def write_common(w, beta_schedule="linear"):
    # The float32-built table every diffusers scheduler uses (identical across the four classes).
    s = DDIMScheduler(beta_schedule=beta_schedule)
    w.table("alphas_cumprod", s.alphas_cumprod.to(torch.float64).tolist())
    w.state("x_T", initial_noise())


SPACINGS = ["linspace", "leading", "trailing"]


def gen_ddim(path):
    w = RefWriter(path, header("DDIMScheduler"))
    write_common(w)
    x_T = initial_noise()
    for spacing in SPACINGS:
        for steps in (10, 7):
            run_ddim(w, x_T, f"ddim/{spacing}/n{steps}", steps, timestep_spacing=spacing)
        run_ddim(w, x_T, f"ddim/{spacing}/n10/alpha_final_ac0", 10, timestep_spacing=spacing,
                 set_alpha_to_one=False)
    # Stable Diffusion's config: leading, steps_offset 1, set_alpha_to_one False.
    run_ddim(w, x_T, "ddim/leading/n10/offset1", 10, timestep_spacing="leading", steps_offset=1,
             set_alpha_to_one=False)
    run_ddim(w, x_T, "ddim/leading/n7/offset1", 7, timestep_spacing="leading", steps_offset=1)
    for pred in ("v_prediction", "sample"):
        run_ddim(w, x_T, f"ddim/trailing/n10/{pred}", 10, timestep_spacing="trailing",
                 prediction_type=pred)
        run_ddim(w, x_T, f"ddim/linspace/n7/{pred}", 7, timestep_spacing="linspace",
                 prediction_type=pred)
    for clipped in (True, False):
        tag = "clipped_output" if clipped else "raw_output"
        run_ddim(w, x_T, f"ddim/leading/n10/clip_sample/{tag}", 10, timestep_spacing="leading",
                 clip_sample=True, clip_sample_range=1.0, use_clipped_model_output=clipped)
        run_ddim(w, x_T, f"ddim/linspace/n7/clip_sample/{tag}", 7, timestep_spacing="linspace",
                 clip_sample=True, clip_sample_range=0.8, use_clipped_model_output=clipped)
        run_ddim(w, x_T, f"ddim/trailing/n10/thresholding/{tag}", 10, timestep_spacing="trailing",
                 thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.6,
                 use_clipped_model_output=clipped)
    # Combined: the raw-eps mix with eta > 0 (the DDIM eps weight depends on eta) and with v.
    run_ddim(w, x_T, "ddim/linspace/n7/eta0.5/clip_sample/raw_output", 7,
             timestep_spacing="linspace", clip_sample=True, clip_sample_range=1.0, eta=0.5,
             noise_seed=9)
    run_ddim(w, x_T, "ddim/trailing/n10/v_prediction/thresholding/raw_output", 10,
             timestep_spacing="trailing", prediction_type="v_prediction", thresholding=True,
             dynamic_thresholding_ratio=0.9, sample_max_value=1.6)
    # issue 11 item 13: set_alpha_to_one=False with linspace / leading spacing ends with a step
    # from timestep 0 to timestep 0 that still clips / thresholds x0 (a changed x when it bites).
    for spacing, steps in (("linspace", 7), ("leading", 10)):
        for clipped in (True, False):
            tag = "clipped_output" if clipped else "raw_output"
            run_ddim(w, x_T, f"ddim/{spacing}/n{steps}/alpha_final_ac0/clip_sample/{tag}", steps,
                     timestep_spacing=spacing, set_alpha_to_one=False, clip_sample=True,
                     clip_sample_range=0.5, use_clipped_model_output=clipped)
        run_ddim(w, x_T, f"ddim/{spacing}/n{steps}/alpha_final_ac0/thresholding/raw_output", steps,
                 timestep_spacing=spacing, set_alpha_to_one=False, thresholding=True,
                 dynamic_thresholding_ratio=0.9, sample_max_value=0.5)
    # issue 11 item 12: sample_max_value < 1 (the clamp pins the threshold at sample_max_value).
    run_ddim(w, x_T, "ddim/trailing/n10/thresholding_max0.5/raw_output", 10,
             timestep_spacing="trailing", thresholding=True, dynamic_thresholding_ratio=0.995,
             sample_max_value=0.5)
    for eta in (0.5, 1.0):
        run_ddim(w, x_T, f"ddim/trailing/n10/eta{eta}", 10, timestep_spacing="trailing", eta=eta,
                 noise_seed=7)
        run_ddim(w, x_T, f"ddim/linspace/n7/eta{eta}", 7, timestep_spacing="linspace", eta=eta,
                 noise_seed=8)
    w.close()


def gen_multistep(path):
    w = RefWriter(path, header("DPMSolverMultistepScheduler"))
    write_common(w)
    x_T = initial_noise()
    for alg in ("dpmsolver++", "dpmsolver"):
        final = "zero" if alg == "dpmsolver++" else "sigma_min"
        for order in (1, 2, 3):
            for spacing in SPACINGS:
                for steps in (10, 20):
                    run_multistep(w, x_T, f"multistep/{alg}/o{order}/{spacing}/n{steps}", steps,
                                  algorithm_type=alg, solver_order=order,
                                  timestep_spacing=spacing, final_sigmas_type=final)
        for order in (2, 3):
            run_multistep(w, x_T, f"multistep/{alg}/o{order}/linspace/n10/no_lower_order_final",
                          10, algorithm_type=alg, solver_order=order, lower_order_final=False,
                          final_sigmas_type="sigma_min")
            run_multistep(w, x_T, f"multistep/{alg}/o{order}/trailing/n20/euler_at_final", 20,
                          algorithm_type=alg, solver_order=order, euler_at_final=True,
                          timestep_spacing="trailing", final_sigmas_type=final)
        run_multistep(w, x_T, f"multistep/{alg}/o2/linspace/n10/heun", 10, algorithm_type=alg,
                      solver_order=2, solver_type="heun", final_sigmas_type=final)
        run_multistep(w, x_T, f"multistep/{alg}/o3/leading/n12/offset1", 12, algorithm_type=alg,
                      solver_order=3, timestep_spacing="leading", steps_offset=1,
                      final_sigmas_type=final)
        run_multistep(w, x_T, f"multistep/{alg}/o2/trailing/n10/v_prediction", 10,
                      algorithm_type=alg, solver_order=2, timestep_spacing="trailing",
                      prediction_type="v_prediction", final_sigmas_type=final)
        run_multistep(w, x_T, f"multistep/{alg}/o3/linspace/n10/thresholding", 10,
                      algorithm_type=alg, solver_order=3, thresholding=True,
                      dynamic_thresholding_ratio=0.9, sample_max_value=1.6,
                      final_sigmas_type=final)
    run_multistep(w, x_T, "multistep/dpmsolver++/o2/linspace/n10/sigma_min", 10,
                  algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min")
    run_multistep(w, x_T, "multistep/dpmsolver++/o3/linspace/n20/sigma_min", 20,
                  algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="sigma_min")
    for spacing in SPACINGS:
        run_multistep(w, x_T, f"multistep/dpmsolver++/o2/{spacing}/n10/lambda_min_clipped", 10,
                      algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing,
                      lambda_min_clipped=-4.5)
    run_multistep(w, x_T, "multistep/dpmsolver++/o2/linspace/n10/karras", 10,
                  algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
    run_multistep(w, x_T, "multistep/dpmsolver++/o3/linspace/n10/lu_lambdas", 10,
                  algorithm_type="dpmsolver++", solver_order=3, use_lu_lambdas=True)
    # issue 11 item 10: karras / lu with final_sigmas_type="sigma_min" ends with a zero-length
    # step (equal sigmas). diffusers gives NaN there for 2M-heun and 3M once lower_order_final
    # no longer applies (n >= 15); the reference keeps its finite steps only.
    for spacing in ("karras", "lu"):
        flag = dict(use_karras_sigmas=True) if spacing == "karras" else dict(use_lu_lambdas=True)
        for alg in ("dpmsolver++", "dpmsolver"):
            for order, stype in ((1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")):
                for steps in (10, 20):
                    run_multistep(w, x_T, f"multistep/{alg}/o{order}/{spacing}/n{steps}/sigma_min"
                                  + ("/heun" if stype == "heun" else ""), steps,
                                  algorithm_type=alg, solver_order=order, solver_type=stype,
                                  final_sigmas_type="sigma_min", **flag)
        run_multistep(w, x_T, f"multistep/dpmsolver++/o3/{spacing}/n10/sigma_min/"
                      "no_lower_order_final", 10, algorithm_type="dpmsolver++", solver_order=3,
                      lower_order_final=False, final_sigmas_type="sigma_min", **flag)
    run_multistep(w, x_T, "multistep/sde-dpmsolver++/o2/karras/n20/sigma_min", 20,
                  algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True,
                  final_sigmas_type="sigma_min", noise_seed=15)
    # issue 11 item 12: sample_max_value < 1.
    run_multistep(w, x_T, "multistep/dpmsolver++/o2/linspace/n10/thresholding_max0.5", 10,
                  algorithm_type="dpmsolver++", solver_order=2, thresholding=True,
                  dynamic_thresholding_ratio=0.995, sample_max_value=0.5)
    # Stochastic variants, given noise (variance_noise).
    for order in (1, 2, 3):
        run_multistep(w, x_T, f"multistep/sde-dpmsolver++/o{order}/linspace/n10", 10,
                      algorithm_type="sde-dpmsolver++", solver_order=order, noise_seed=11)
    run_multistep(w, x_T, "multistep/sde-dpmsolver++/o2/trailing/n10/heun", 10,
                  algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun",
                  timestep_spacing="trailing", noise_seed=12)
    # sde-dpmsolver has no third-order update in diffusers (UnboundLocalError): orders 1, 2 only.
    for order in (1, 2):
        run_multistep(w, x_T, f"multistep/sde-dpmsolver/o{order}/linspace/n10", 10,
                      algorithm_type="sde-dpmsolver", solver_order=order,
                      final_sigmas_type="sigma_min", noise_seed=13)
    run_multistep(w, x_T, "multistep/sde-dpmsolver/o2/trailing/n10/heun", 10,
                  algorithm_type="sde-dpmsolver", solver_order=2, solver_type="heun",
                  timestep_spacing="trailing", final_sigmas_type="sigma_min", noise_seed=14)
    w.close()


def gen_singlestep(path):
    w = RefWriter(path, header("DPMSolverSinglestepScheduler"))
    write_common(w)
    x_T = initial_noise()
    for alg in ("dpmsolver++", "dpmsolver"):
        final = "zero" if alg == "dpmsolver++" else "sigma_min"
        for order in (1, 2, 3):
            for steps in (9, 10, 11):
                run_singlestep(w, x_T, f"singlestep/{alg}/o{order}/n{steps}", steps,
                               algorithm_type=alg, solver_order=order, final_sigmas_type=final)
            run_singlestep(w, x_T, f"singlestep/{alg}/o{order}/n12/lower_order_final", 12,
                           algorithm_type=alg, solver_order=order, lower_order_final=True,
                           final_sigmas_type=final)
        for order in (2, 3):
            run_singlestep(w, x_T, f"singlestep/{alg}/o{order}/n12/heun", 12, algorithm_type=alg,
                           solver_order=order, solver_type="heun", final_sigmas_type=final)
        run_singlestep(w, x_T, f"singlestep/{alg}/o2/n10/lambda_min_clipped", 10,
                       algorithm_type=alg, solver_order=2, lambda_min_clipped=-4.5,
                       final_sigmas_type=final)
        run_singlestep(w, x_T, f"singlestep/{alg}/o3/n12/sigma_min", 12, algorithm_type=alg,
                       solver_order=3, final_sigmas_type="sigma_min")
        run_singlestep(w, x_T, f"singlestep/{alg}/o2/n10/v_prediction", 10, algorithm_type=alg,
                       solver_order=2, prediction_type="v_prediction", final_sigmas_type=final)
        # issue 11 items 10, 11: use_karras_sigmas, both final sigmas types.
        for order in (1, 2, 3):
            for steps in (10, 12):
                for fin in (("zero", "sigma_min") if alg == "dpmsolver++" else ("sigma_min",)):
                    run_singlestep(w, x_T, f"singlestep/{alg}/o{order}/karras/n{steps}/{fin}",
                                   steps, algorithm_type=alg, solver_order=order,
                                   use_karras_sigmas=True, final_sigmas_type=fin)
        run_singlestep(w, x_T, f"singlestep/{alg}/o3/karras/n12/sigma_min/heun", 12,
                       algorithm_type=alg, solver_order=3, solver_type="heun",
                       use_karras_sigmas=True, final_sigmas_type="sigma_min")
        # diffusers 0.42.1 bug: singlestep "dpmsolver" + thresholding indexes alpha_t[timestep]
        # with timestep = None (the deprecated argument) and fails with a shape error.
        if alg == "dpmsolver++":
            run_singlestep(w, x_T, f"singlestep/{alg}/o3/n12/thresholding", 12,
                           algorithm_type=alg, solver_order=3, thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=1.6,
                           final_sigmas_type=final)
            run_singlestep(w, x_T, f"singlestep/{alg}/o2/n10/thresholding_max0.5", 10,
                           algorithm_type=alg, solver_order=2, thresholding=True,
                           dynamic_thresholding_ratio=0.995, sample_max_value=0.5,
                           final_sigmas_type=final)
    w.close()


def gen_deis(path):
    w = RefWriter(path, header("DEISMultistepScheduler"))
    write_common(w)
    x_T = initial_noise()
    for order in (1, 2, 3):
        for spacing in SPACINGS:
            for steps in (10, 20):
                run_deis(w, x_T, f"deis/o{order}/{spacing}/n{steps}", steps, solver_order=order,
                         timestep_spacing=spacing)
    for order in (2, 3):
        run_deis(w, x_T, f"deis/o{order}/linspace/n10/no_lower_order_final", 10,
                 solver_order=order, lower_order_final=False)
    run_deis(w, x_T, "deis/o3/leading/n12/offset1", 12, solver_order=3, timestep_spacing="leading",
             steps_offset=1)
    run_deis(w, x_T, "deis/o2/trailing/n10/v_prediction", 10, solver_order=2,
             timestep_spacing="trailing", prediction_type="v_prediction")
    run_deis(w, x_T, "deis/o3/linspace/n10/thresholding", 10, solver_order=3, thresholding=True,
             dynamic_thresholding_ratio=0.9, sample_max_value=1.6)
    run_deis(w, x_T, "deis/o2/linspace/n10/thresholding_max0.5", 10, solver_order=2,
             thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=0.5)
    w.close()


def gen_timesteps(path):
    """Integer timesteps of every spacing for many step counts (no sampling)."""
    w = RefWriter(path, header("timesteps of DDIM / DPMSolverMultistep (= DEIS) / DPMSolverSinglestep"))
    counts = list(range(1, 41)) + [50, 64, 99, 100, 127, 333]
    empty = []
    for n in counts:
        for spacing in SPACINGS:
            for offset in ((0, 1) if spacing == "leading" else (0,)):
                s = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
                s.set_timesteps(n)
                w.case(f"timesteps/ddim/{spacing}/offset{offset}/n{n}",
                       dict(scheduler="ddim", timestep_spacing=spacing, steps_offset=offset,
                            num_inference_steps=n), s.timesteps, empty)
                s = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
                s.set_timesteps(n)
                w.case(f"timesteps/dpmsolver_multistep/{spacing}/offset{offset}/n{n}",
                       dict(scheduler="dpmsolver_multistep", timestep_spacing=spacing,
                            steps_offset=offset, num_inference_steps=n), s.timesteps, empty)
        s = DPMSolverSinglestepScheduler()
        s.set_timesteps(n)
        w.case(f"timesteps/dpmsolver_singlestep/n{n}",
               dict(scheduler="dpmsolver_singlestep", num_inference_steps=n), s.timesteps, empty)
    w.close()


def gen_trailing(path):
    """issue 11 item 14: trailing spacing for every n = 1..N. For 62 values of n numpy's
    arange(N, 0, -N/n) has n + 1 entries, the last ~1e-13, so diffusers' timesteps end in -1
    (which DDIM reads as alphas_cumprod[-1] = timestep N - 1, and DPM-Solver / DEIS clamp to
    the sigma of timestep 0 by np.interp). Only checksums of every list are stored (length,
    sum, sum of (i + 1) t_i, last), plus full runs of two wrapping step counts."""
    w = RefWriter(path, header("trailing timesteps for n = 1..1000; runs that end in timestep -1"))
    write_common(w)
    x_T = initial_noise()
    counts = list(range(1, 1001))
    for name, cls in (("ddim", DDIMScheduler), ("dpmsolver_multistep", DPMSolverMultistepScheduler),
                      ("deis_multistep", DEISMultistepScheduler)):
        lengths, sums, wsums, lasts = [], [], [], []
        for n in counts:
            sch = cls(timestep_spacing="trailing")
            sch.set_timesteps(n)
            ts = [int(t) for t in sch.timesteps]
            lengths.append(len(ts))
            sums.append(sum(ts))
            wsums.append(sum((i + 1) * t for i, t in enumerate(ts)))
            lasts.append(ts[-1])
        w.f.write(f"case trailing_checksums/{name}\n")
        w.f.write(f"param scheduler {name}\n")
        for key, vals in (("n", counts), ("length", lengths), ("sum", sums), ("wsum", wsums),
                          ("last", lasts)):
            w.f.write(f"{key} {len(vals)} " + " ".join(str(v) for v in vals) + "\n")
        w.f.write("end\n")
    # Full runs where diffusers steps through timestep -1 (reproduced by diffgrad only with
    # ReferenceQuirks::trailing_wrap).
    # The files keep the last KEEP states of these long runs (param first_state_step).
    keep = RefWriter.keep_last
    RefWriter.keep_last = 4
    run_ddim(w, x_T, "ddim/trailing/n61/wrap", 61, timestep_spacing="trailing")
    run_ddim(w, x_T, "ddim/trailing/n61/wrap/alpha_final_ac0", 61, timestep_spacing="trailing",
             set_alpha_to_one=False)
    for fin in ("zero", "sigma_min"):
        run_multistep(w, x_T, f"multistep/dpmsolver++/o2/trailing/n61/wrap/{fin}", 61,
                      algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
                      final_sigmas_type=fin)
    run_deis(w, x_T, "deis/o2/trailing/n61/wrap", 61, solver_order=2, timestep_spacing="trailing")
    RefWriter.keep_last = keep
    w.close()


def gen_partial(path):
    """issue 11 item 15: img2img-style partial starts, as diffusers' own tests run them:
    set_timesteps(n), set_begin_index(t_start) (DPM-Solver / DEIS), x = add_noise(x0, noise,
    timesteps[t_start]), then step through timesteps[t_start:]."""
    w = RefWriter(path, header("partial starts: add_noise at timesteps[t_start], then step"))
    write_common(w)
    g = torch.Generator().manual_seed(31)
    x0 = torch.rand(BATCH, DIM, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(BATCH, DIM, generator=g, dtype=torch.float64)
    w.state("x0", x0)
    w.state("noise", noise)

    def start(s, t_start):
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(t_start)
        t = s.timesteps[t_start:t_start + 1]
        return s.add_noise(x0.reshape(BATCH, 1, DIM), noise.reshape(BATCH, 1, DIM), t).reshape(
            BATCH, DIM)

    def finish(s, name, keys, scheduler, steps, t_start, extra=None, noise_seed=None):
        x = start(s, t_start)
        noises = (step_noises(len(s.timesteps) - t_start, noise_seed)
                  if noise_seed is not None else None)
        states = run_loop(s, x, None, noises, t_start)
        assert len(states) == len(s.timesteps) - t_start
        params = params_of(s, keys, dict(scheduler=scheduler, num_inference_steps=steps,
                                         t_start=t_start))
        if extra:
            params.update(extra)
        w.case(name, params, s.timesteps, states, noises)

    for spacing, steps, t_start in (("leading", 10, 3), ("linspace", 7, 2), ("trailing", 20, 9)):
        s = DDIM64(timestep_spacing=spacing, clip_sample=False)
        upcast_tables(s)
        s.set_timesteps(steps)
        finish(s, f"partial/ddim/{spacing}/n{steps}/start{t_start}", DDIM_KEYS, "ddim", steps,
               t_start, dict(eta=0.0, use_clipped_model_output=False))
    for order, steps, t_start, extra in ((2, 20, 8, {}), (3, 20, 8, {}), (3, 12, 4, {}),
                                         (2, 20, 6, dict(use_karras_sigmas=True,
                                                         final_sigmas_type="sigma_min"))):
        s = MULTI64(solver_order=order, **extra)
        upcast_tables(s)
        s.set_timesteps(steps)
        tag = "/karras/sigma_min" if extra else ""
        finish(s, f"partial/multistep/o{order}/n{steps}/start{t_start}{tag}", DPM_KEYS,
               "dpmsolver_multistep", steps, t_start)
    s = MULTI64(algorithm_type="sde-dpmsolver++", solver_order=2)
    upcast_tables(s)
    s.set_timesteps(20)
    finish(s, "partial/multistep/sde-dpmsolver++/o2/n20/start8", DPM_KEYS, "dpmsolver_multistep",
           20, 8, noise_seed=16)
    for order, steps, t_start in ((2, 10, 3), (3, 12, 4), (3, 12, 5), (3, 11, 2)):
        s = SINGLE64(solver_order=order)
        upcast_tables(s)
        s.set_timesteps(steps)
        finish(s, f"partial/singlestep/o{order}/n{steps}/start{t_start}", SINGLE_KEYS,
               "dpmsolver_singlestep", steps, t_start,
               dict(order_list=",".join(str(o) for o in s.order_list)))
    for order, steps, t_start in ((3, 20, 8), (3, 12, 4)):
        s = DEIS64(solver_order=order)
        upcast_tables(s)
        s.set_timesteps(steps)
        finish(s, f"partial/deis/o{order}/n{steps}/start{t_start}", DEIS_KEYS, "deis_multistep",
               steps, t_start)
    w.close()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.normpath(os.path.join(here, "..", "..", "tests", "data", "compat"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_out, help="output folder (default: %(default)s)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gen_ddim(os.path.join(args.out, "diffusers_ddim.txt"))
    gen_multistep(os.path.join(args.out, "diffusers_dpmsolver_multistep.txt"))
    gen_singlestep(os.path.join(args.out, "diffusers_dpmsolver_singlestep.txt"))
    gen_deis(os.path.join(args.out, "diffusers_deis.txt"))
    gen_timesteps(os.path.join(args.out, "diffusers_timesteps.txt"))
    gen_trailing(os.path.join(args.out, "diffusers_trailing.txt"))
    gen_partial(os.path.join(args.out, "diffusers_partial.txt"))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
