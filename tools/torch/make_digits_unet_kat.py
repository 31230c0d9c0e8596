#!/usr/bin/env python3
"""Known-answer values of the committed digits UNet (data/models/digits_unet_f{32,64}.pt), for
tests/torch/test_digits_unet.cpp: eps of both files on a fixed input, and the float64 VJP
<w, eps> with respect to the input. Needs torch only (no diffusers): the TorchScript files are
loaded with torch.jit.load, as the C++ side loads them.

The input is a closed formula rounded to 20 fractional bits, so it is exact in float32 and
float64 (both files see the same numbers; the C++ test rebuilds it from the file):
    x[b, p] = round(2^20 * 0.9 sin(0.37 (p + 1) + 1.3 b)) / 2^20,  p = 0..63 (row-major 8x8)
    w[b, p] = round(2^20 * cos(0.23 (p + 1) - 0.7 b)) / 2^20
    class labels [3, 7, 10, 0] (10 = unconditional), b = 0..3
One case per timestep 999, 500, 7, 0: the whole batch of 4 at that timestep in one call (an
int64 tensor of shape [4] holding it), as a sampler calls the network.

    /usr/bin/python3 tools/torch/make_digits_unet_kat.py      # writes data/models/digits_unet_kat.txt
"""
import math
import os
import pathlib
import platform

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMESTEPS = [999, 500, 7, 0]
VJP_TIMESTEP = 500
BATCH = 4
LABELS = [3, 7, 10, 0]
# DIFFGRAD_MODELS_DIR: read the .pt files from and write the values to another folder.
MODELS = pathlib.Path(os.environ.get("DIFFGRAD_MODELS_DIR", ROOT / "data/models"))


def fixed(formula):
    return torch.tensor([[round(formula(b, p) * 2**20) / 2**20 for p in range(64)]
                         for b in range(BATCH)], dtype=torch.float64)


def main():
    torch.set_num_threads(1)
    x = fixed(lambda b, p: 0.9 * math.sin(0.37 * (p + 1) + 1.3 * b))
    w = fixed(lambda b, p: math.cos(0.23 * (p + 1) - 0.7 * b))
    c = torch.tensor(LABELS, dtype=torch.int64)
    lines = [
        "# Known-answer values of data/models/digits_unet_f32.pt and digits_unet_f64.pt",
        "# written by tools/torch/make_digits_unet_kat.py (torch %s, python %s, %s, 1 thread)"
        % (torch.__version__, platform.python_version(), platform.machine()),
        "# x, w: B x 64 (row-major 8x8 images, fed as B x 1 x 8 x 8); class_labels: int64 [B]",
        "# eps_f64 <k> / eps_f32 <k>: the module's output for the whole batch at timestep k (int64 [B]);",
        "# vjp_x_f64 <k>: d<w, eps_f64>/dx at timestep k (torch autograd)",
        "# values: repr() of the doubles (float32 outputs are exact in double)",
        "batch %d" % BATCH,
        "class_labels " + " ".join(map(str, LABELS)),
        "x " + " ".join(repr(v) for v in x.flatten().tolist()),
        "w " + " ".join(repr(v) for v in w.flatten().tolist()),
    ]
    for dtype, name in [(torch.float64, "f64"), (torch.float32, "f32")]:
        module = torch.jit.load(str(MODELS / ("digits_unet_%s.pt" % name)))
        for k in TIMESTEPS:
            t = torch.full((BATCH,), k, dtype=torch.int64)
            xin = x.to(dtype).reshape(-1, 1, 8, 8).requires_grad_(True)
            eps = module(xin, t, c)
            assert eps.dtype == dtype and eps.shape == xin.shape
            lines.append("eps_%s %d " % (name, k) +
                         " ".join(repr(float(v)) for v in eps.detach().flatten().tolist()))
            if dtype == torch.float64 and k == VJP_TIMESTEP:
                (g,) = torch.autograd.grad((w.reshape(eps.shape) * eps).sum(), [xin])
                lines.append("vjp_x_f64 %d " % k + " ".join(repr(v) for v in g.flatten().tolist()))
    out = MODELS / "digits_unet_kat.txt"
    out.write_text("\n".join(lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
