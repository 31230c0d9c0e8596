"""Writes the scheduler_config.json files of this folder with diffusers' own save_config.

Run from the repository root with the venv of benchmarks/compare (diffusers 0.42.1):
    benchmarks/compare/.venv/bin/python tests/data/scheduler_configs/dump_configs.py
tests/json_scheduler_test.cpp loads each file and replays the compat reference case named in
its test (tests/data/compat/diffusers_*.txt).
"""
import json
import os
import tempfile

from diffusers import (DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, PNDMScheduler)

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = {
    # the four classes with diffusers' defaults
    "ddim_default": DDIMScheduler(),
    "dpmsolver_multistep_default": DPMSolverMultistepScheduler(),
    "dpmsolver_singlestep_default": DPMSolverSinglestepScheduler(),
    "deis_default": DEISMultistepScheduler(),
    # variants that change many keys at once
    "ddim_trailing_v_thresholding": DDIMScheduler(
        timestep_spacing="trailing", prediction_type="v_prediction", thresholding=True,
        clip_sample=False, dynamic_thresholding_ratio=0.9, sample_max_value=1.6),
    "dpmsolver_3m_karras_sigma_min": DPMSolverMultistepScheduler(
        solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    "dpmsolver_2m_sde_karras_sigma_min": DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    # a Stable Diffusion 1.x style pipeline config (PNDMScheduler, scaled_linear betas)
    "pndm_stable_diffusion": PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1),
}

for name, scheduler in CONFIGS.items():
    with tempfile.TemporaryDirectory() as tmp:
        scheduler.save_config(tmp)
        with open(os.path.join(tmp, "scheduler_config.json")) as f:
            text = f.read()
    json.loads(text)  # Python's own parser accepts it (Infinity included)
    with open(os.path.join(HERE, name + ".json"), "w") as f:
        f.write(text)
    print(name, len(text), "bytes")

# diffusers' float32 alphas_cumprod of three training tables, every 7th entry and the last, as
# exact decimal strings of the float32 values (TrainingTable::diffusers_alphas_cumprod must
# match them bit for bit).
tables = {}
for name, scheduler in {
        "linear": DDIMScheduler(),
        "scaled_linear_sd": DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                          beta_schedule="scaled_linear"),
        "squaredcos_cap_v2": DDIMScheduler(beta_schedule="squaredcos_cap_v2"),
}.items():
    acp = scheduler.alphas_cumprod
    indices = list(range(0, len(acp), 7)) + [len(acp) - 1]
    cfg = dict(scheduler.config)
    tables[name] = {"beta_schedule": cfg["beta_schedule"], "beta_start": cfg["beta_start"],
                    "beta_end": cfg["beta_end"], "indices": indices,
                    "alphas_cumprod": [repr(float(acp[i])) for i in indices]}
with open(os.path.join(HERE, "alphas_cumprod_samples.json"), "w") as f:
    json.dump(tables, f, indent=1)
print("alphas_cumprod_samples.json written")
