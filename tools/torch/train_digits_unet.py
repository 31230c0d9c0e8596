#!/usr/bin/env python3
"""Train the learned model shipped with diffgrad: a tiny class-conditional UNet eps-network on
the 8x8 digits (data/digits/digits.txt), exported to TorchScript (one file per dtype).

Network: diffusers' UNet2DModel (diffusers 0.30.3), sample_size 8, 1 channel,
block_out_channels (16, 32), layers_per_block 1, no attention, GroupNorm with 8 groups,
num_class_embeds 11 (labels 0..9 are the digits, label 10 is the "no class" label used for
classifier-free guidance: 10 % of the training labels are replaced by it).
Schedule: diffusers' DDPM table, 1000 steps, linear betas 1e-4 .. 2e-2 (the diffusers default, the
table compat::TrainingTable::diffusers_alphas_cumprod() reproduces bit for bit).
Objective: eps prediction, x_t = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps, k uniform in 0..999,
pixels scaled from 0..16 to [-1, 1] (as examples/common/digits.hpp does).
Deterministic: seeded (torch.manual_seed, a seeded generator for batches, timesteps and noise),
torch.use_deterministic_algorithms(True), one thread. Float32 training with Adam, cosine decay.

Export: torch.jit.trace of DigitsEps (forward(sample, timestep, class_labels) -> eps), with
  sample        float32 / float64 tensor, shape [B, 1, 8, 8]
  timestep      int64 tensor, shape [B] (diffusers' integer timestep 0..999; a 0-d int64 tensor
                is broadcast to the batch)
  class_labels  int64 tensor, shape [B], values 0..10 (10 = unconditional)
  returns       eps, same dtype and shape as sample.
The float64 file holds the float32 weights cast to float64 (a trace bakes in its dtype).

Run (from the repository root; the venv is described in data/models/README.md):
    benchmarks/compare/.venv-diffusers030/bin/python tools/torch/train_digits_unet.py
"""
import argparse
import hashlib
import json
import math
import pathlib
import platform
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
NULL_CLASS = 10


def load_digits(path):
    labels, images = [], []
    header_seen = False
    for line in open(path):
        if not line.strip() or line.startswith("#"):
            continue
        if not header_seen:
            magic, version, count, rows, cols = line.split()
            assert magic == "diffgrad-digits" and version == "1" and rows == cols == "8"
            header_seen = True
            continue
        label, pixels = line.split()
        labels.append(int(label))
        images.append([int(c, 17) / 8.0 - 1.0 for c in pixels])
    assert len(images) == int(count)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(labels, dtype=torch.int64)


def make_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=11,
    )


class DigitsEps(torch.nn.Module):
    """The traced interface: eps = unet(sample, timestep, class_labels)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels):
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def diffusers_alphas_cumprod():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                          beta_schedule="linear")
    return sched.alphas_cumprod.clone()  # float32, diffusers' own table


def sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--out", default=str(ROOT / "data/models"))
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x_all, y_all = load_digits(ROOT / "data/digits/digits.txt")
    abar = diffusers_alphas_cumprod()
    sqrt_abar, sqrt_1m_abar = abar.sqrt(), (1 - abar).sqrt()
    unet = make_unet()
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.Adam(unet.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))

    import diffusers

    log_lines = [
        "# diffgrad digits UNet training log (tools/torch/train_digits_unet.py)",
        f"# torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, threads {torch.get_num_threads()}",
        f"# args {json.dumps(vars(args))}",
        f"# data: {x_all.shape[0]} images; parameters: {n_params}",
        "# step  loss(mean of the last 50 steps)  lr  elapsed_s",
    ]
    print("\n".join(log_lines), flush=True)
    losses = []
    t_start = time.time()
    unet.train()
    for step in range(args.steps):
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < args.p_uncond
        y[drop] = NULL_CLASS
        k = torch.randint(0, 1000, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sqrt_abar[k].view(-1, 1, 1, 1) * x0 + sqrt_1m_abar[k].view(-1, 1, 1, 1) * noise
        pred = unet(xt, k, class_labels=y, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            line = (f"{step + 1:6d}  {sum(losses[-50:]) / 50:.6f}  {sched.get_last_lr()[0]:.3e}  "
                    f"{time.time() - t_start:.1f}")
            log_lines.append(line)
            print(line, flush=True)
    train_s = time.time() - t_start
    last = losses[-250:]

    # Held-out-style evaluation: a fixed batch of all images at fixed (k, noise), no label drop.
    unet.eval()
    egen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        k = torch.randint(0, 1000, (x_all.shape[0],), generator=egen)
        noise = torch.randn(x_all.shape, generator=egen)
        xt = sqrt_abar[k].view(-1, 1, 1, 1) * x_all + sqrt_1m_abar[k].view(-1, 1, 1, 1) * noise
        eval_loss = torch.nn.functional.mse_loss(unet(xt, k, class_labels=y_all).sample, noise).item()
        eval_uncond = torch.nn.functional.mse_loss(
            unet(xt, k, class_labels=torch.full_like(y_all, NULL_CLASS)).sample, noise).item()
    log_lines.append(f"# training time {train_s:.1f} s; final loss (mean of the last 250 steps) "
                     f"{sum(last) / len(last):.6f}")
    log_lines.append(f"# eval: all {x_all.shape[0]} images, fixed k and noise (seed 12345): "
                     f"mse conditional {eval_loss:.6f}, unconditional {eval_uncond:.6f}")
    print("\n".join(log_lines[-2:]), flush=True)

    # Export: one trace per dtype; check it against eager, at other batch sizes, and its autograd.
    files = {}
    for dtype, name in [(torch.float32, "digits_unet_f32.pt"), (torch.float64, "digits_unet_f64.pt")]:
        wrapper = DigitsEps(make_unet()).eval()
        wrapper.unet.load_state_dict(unet.state_dict())
        wrapper = wrapper.to(dtype)
        for p in wrapper.parameters():
            p.requires_grad_(True)
        ex = (torch.randn(2, 1, 8, 8, dtype=dtype, generator=egen), torch.tensor([999, 10]),
              torch.tensor([3, NULL_CLASS]))
        traced = torch.jit.trace(wrapper, ex, check_trace=False)
        path = out / name
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for b in (1, 3, 17):
            x = torch.randn(b, 1, 8, 8, dtype=dtype, generator=egen, requires_grad=True)
            t = torch.randint(0, 1000, (b,), generator=egen)
            c = torch.randint(0, 11, (b,), generator=egen)
            ref = wrapper(x, t, c)
            got = loaded(x, t, c)
            err = ((got - ref).norm() / ref.norm()).item()
            assert err <= tol, (name, b, err)
            # a 0-d timestep is broadcast to the batch
            got0 = loaded(x, t[0], c)
            ref0 = wrapper(x, t[0].expand(b), c)
            assert ((got0 - ref0).norm() / ref0.norm()).item() <= tol
            # autograd through the loaded module: input and parameters, against eager
            w = torch.randn(got.shape, dtype=dtype, generator=egen)
            g_loaded = torch.autograd.grad((w * got).sum(), [x] + list(loaded.parameters()))
            g_eager = torch.autograd.grad((w * ref).sum(), [x] + list(wrapper.parameters()))
            for a, e in zip(g_loaded, g_eager):
                assert ((a - e).norm() / max(e.norm().item(), 1e-300)).item() <= 10 * tol, name
        n_loaded = sum(p.numel() for p in loaded.parameters())
        assert n_loaded == n_params
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256(path), "dtype": str(dtype)}
        log_lines.append(f"# exported {name}: {path.stat().st_size} bytes, sha256 {files[name]['sha256']}; "
                         f"trace == eager, batch 1/3/17 and 0-d timestep, autograd wrt input and "
                         f"{len(list(loaded.parameters()))} parameter tensors checked")
        print(log_lines[-1], flush=True)

    (out / "digits_unet_train_log.txt").write_text("\n".join(log_lines) + "\n")
    config = {
        "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()
                 if not k.startswith("_")},
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                     "beta_end": 0.02, "prediction_type": "epsilon"},
        "interface": {"sample": "float [B,1,8,8], pixels in [-1,1]", "timestep": "int64 [B] (or 0-d)",
                      "class_labels": "int64 [B], 0..9 digit, 10 = unconditional",
                      "returns": "eps, same dtype/shape as sample"},
        "training": vars(args) | {"parameters": n_params, "train_seconds": round(train_s, 1),
                                  "final_loss_last250": sum(last) / len(last),
                                  "eval_mse_conditional": eval_loss,
                                  "eval_mse_unconditional": eval_uncond},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "files": files,
    }
    (out / "digits_unet_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(range(1, len(losses) + 1), losses, lw=0.3, alpha=0.4, label="per step")
        smooth = [sum(losses[max(0, i - 49):i + 1]) / len(losses[max(0, i - 49):i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.2, label="mean of 50 steps")
        ax.set_yscale("log")
        ax.set_xlabel("step (batch %d)" % args.batch)
        ax.set_ylabel("eps MSE")
        ax.set_title("digits UNet (diffusers UNet2DModel, %d params)" % n_params)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "digits_unet_loss.png", metadata={"Software": None})
    except ImportError:
        print("matplotlib not found: no loss-curve PNG", file=sys.stderr)


if __name__ == "__main__":
    main()
