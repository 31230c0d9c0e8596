#!/usr/bin/python3
"""Writes the TorchScript test modules of diffgrad's LibTorch adapter and their reference
values, computed by torch's own autograd in Python, into tests/torch/data/.

Run with the interpreter whose torch matches the LibTorch the tests link against (Debian:
/usr/bin/python3 with python3-torch 1.13.1, matching libtorch-dev 1.13.1):

    /usr/bin/python3 tools/torch/make_test_modules.py [output directory]

Deterministic: fixed seeds, one thread, PYTHONHASHSEED=0 (the script re-executes itself with
it); two runs from the same checkout write identical files (TorchScript also records the
script's absolute path in the .pt debug info). Files written:
  convnet_f64.pt, convnet_f32.pt   forward(x [B,1,4,4], t [B] float, cond [B,3] float) -> eps
  classnet_f64.pt                  forward(sample [B,1,4,4], timestep [B] int64,
                                           class_labels [B] int64) -> (eps,)   (diffusers-like)
  convnet_f64.txt, convnet_f32.txt, classnet_f64.txt
                                   inputs, eps, and the VJPs dx, dcond, dparams for a cotangent
  ddim_convnet_f64.txt             25 DDIM steps (VP linear schedule, beta 0.1..20, uniform t
                                   from 1 to 1e-3) through convnet_f64 and the gradient of
                                   L = sum(w * x_0) w.r.t. x_T, cond and the parameters
Text format: one array per line, "<name> <count> <values...>" (values printed with repr, so
float64 values round-trip exactly); '#' starts a comment line.
"""
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNet(nn.Module):
    """A small conditional conv eps-network: smooth (tanh), so finite differences work."""

    def __init__(self, channels: int = 1, hidden: int = 4, cond_dim: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time_proj = nn.Linear(2, hidden)
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        features = torch.stack([torch.sin(3.0 * t), torch.cos(3.0 * t)], dim=1)
        shift = self.time_proj(features) + self.cond_proj(cond)
        h = torch.tanh(self.conv_in(x) + shift[:, :, None, None])
        return self.conv_out(h) + 0.1 * x * h.mean(dim=1, keepdim=True)


class ClassNet(nn.Module):
    """diffusers' calling convention: integer timesteps, integer class labels, a tuple out."""

    def __init__(self, hidden: int = 4, num_timesteps: int = 1000, num_classes: int = 10):
        super().__init__()
        self.time_embedding = nn.Embedding(num_timesteps, hidden)
        self.class_embedding = nn.Embedding(num_classes, hidden)
        self.conv_in = nn.Conv2d(1, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor):
        emb = self.time_embedding(timestep) + self.class_embedding(class_labels)
        h = F.silu(self.conv_in(sample) + emb[:, :, None, None])
        return (self.conv_out(h),)


def write_arrays(path, header, arrays):
    with open(path, "w") as f:
        f.write(f"# {header}\n# written by tools/torch/make_test_modules.py (torch "
                f"{torch.__version__}); do not edit\n")
        for name, value in arrays:
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
                f.write(f"{name} {len(value)} {' '.join(value)}\n")
                continue
            flat = value.detach().reshape(-1).tolist() if torch.is_tensor(value) else list(value)
            f.write(f"{name} {len(flat)} {' '.join(repr(float(v)) for v in flat)}\n")


def flat_param_grads(module, grads):
    return torch.cat([g.reshape(-1) for g in grads])


def vjp_reference(module, x, t, cond, a, cond_differentiable):
    """eps and the VJPs of <a, eps> w.r.t. x, cond (if floating) and the parameters."""
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    x = x.clone().requires_grad_(True)
    inputs = [x]
    if cond_differentiable:
        cond = cond.clone().requires_grad_(True)
        inputs.append(cond)
    out = module(x, t, cond)
    eps = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(eps, inputs + params, grad_outputs=a)
    result = [("param_names", names), ("eps", eps), ("dx", grads[0])]
    if cond_differentiable:
        result.append(("dcond", grads[1]))
    result.append(("dparams", flat_param_grads(module, grads[len(inputs):])))
    return result


def vp_linear_node(t, beta_min=0.1, beta_max=20.0):
    log_alpha = -0.25 * (beta_max - beta_min) * t * t - 0.5 * beta_min * t
    return math.exp(log_alpha), math.sqrt(-math.expm1(2.0 * log_alpha))


def main():
    # TorchScript writes a module's constants in set order, which depends on Python's string
    # hash seed: fix it, so the .pt archives are reproduced byte for byte too.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "torch", "data")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(20261206)

    # --- convnet: float64 and float32 (the same weights) ---------------------------------
    net = ConvNet().double()
    with torch.no_grad():  # larger weights than the default init: a less linear network
        for p in net.parameters():
            p.mul_(1.5)
    batch = 2
    x = torch.randn(batch, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.7, 0.7], dtype=torch.float64)
    cond = torch.randn(batch, 3, dtype=torch.float64)
    a = torch.randn(batch, 1, 4, 4, dtype=torch.float64)
    for dtype, suffix in ((torch.float64, "f64"), (torch.float32, "f32")):
        m = torch.jit.script(ConvNet().to(dtype))
        m.load_state_dict({k: v.to(dtype) for k, v in net.state_dict().items()})
        m.eval()
        torch.jit.save(m, os.path.join(out_dir, f"convnet_{suffix}.pt"))
        loaded = torch.jit.load(os.path.join(out_dir, f"convnet_{suffix}.pt"))
        arrays = [("x", x.to(dtype)), ("t", t.to(dtype)), ("cond", cond.to(dtype)),
                  ("a", a.to(dtype))]
        arrays += vjp_reference(loaded, x.to(dtype), t.to(dtype), cond.to(dtype), a.to(dtype),
                                True)
        write_arrays(os.path.join(out_dir, f"convnet_{suffix}.txt"),
                     f"convnet_{suffix}.pt: x [2,1,4,4], t [2], cond [2,3], cotangent a",
                     arrays)

    # --- classnet: integer timesteps and labels, tuple output ----------------------------
    cnet = torch.jit.script(ClassNet().double())
    cnet.eval()
    torch.jit.save(cnet, os.path.join(out_dir, "classnet_f64.pt"))
    loaded = torch.jit.load(os.path.join(out_dir, "classnet_f64.pt"))
    timestep = torch.tensor([417, 417], dtype=torch.long)
    labels = torch.tensor([3, 7], dtype=torch.long)
    arrays = [("x", x), ("timestep", [417.0, 417.0]), ("labels", [3.0, 7.0]), ("a", a)]
    arrays += vjp_reference(loaded, x, timestep, labels, a, False)
    write_arrays(os.path.join(out_dir, "classnet_f64.txt"),
                 "classnet_f64.pt: x [2,1,4,4], timestep [2] int64, labels [2] int64", arrays)

    # --- 25 DDIM steps through convnet_f64, gradient of sum(w * x_0) ---------------------
    steps = 25
    model = torch.jit.load(os.path.join(out_dir, "convnet_f64.pt"))
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    x_T = torch.randn(batch, 16, dtype=torch.float64, requires_grad=True)
    cond_d = cond.clone().requires_grad_(True)
    w = torch.randn(batch, 16, dtype=torch.float64)
    times = [1.0 + (1e-3 - 1.0) * i / steps for i in range(steps + 1)]
    times[-1] = 1e-3
    nodes = [vp_linear_node(ti) for ti in times]
    xi = x_T
    for i in range(steps):
        (alpha_s, sigma_s), (alpha_t, sigma_t) = nodes[i], nodes[i + 1]
        tt = torch.full((batch,), times[i], dtype=torch.float64)
        eps = model(xi.reshape(batch, 1, 4, 4), tt, cond_d).reshape(batch, 16)
        ratio = alpha_t / alpha_s
        xi = ratio * xi + (sigma_t - ratio * sigma_s) * eps
    loss = (w * xi).sum()
    grads = torch.autograd.grad(loss, [x_T, cond_d] + params)
    write_arrays(os.path.join(out_dir, "ddim_convnet_f64.txt"),
                 f"{steps} DDIM steps through convnet_f64.pt, L = sum(w * x_0)",
                 [("steps", [float(steps)]), ("times", times),
                  ("alpha", [n[0] for n in nodes]), ("sigma", [n[1] for n in nodes]),
                  ("x_T", x_T), ("cond", cond_d), ("w", w), ("x0", xi),
                  ("loss", [loss.item()]), ("param_names", names), ("grad_x", grads[0]),
                  ("grad_cond", grads[1]), ("grad_params", flat_param_grads(model, grads[2:]))])


if __name__ == "__main__":
    main()
