"""Shared by the peer-comparison scripts (bench_*.py): the torch twin of diffgrad's MLP
(models/mlp.hpp), matrix files in the drivers' text format, the C++ drivers, peak-memory
measurement and the environment line every table carries.

The twin reads the file diffgrad's Mlp::save writes, so both sides run the same weights:
    input  h_0 = [x | sin(omega_j tau) j < F | cos(omega_j tau) j < F | z],  tau = time_scale t,
           omega_j = pi 2^j (computed in float64 with math.sin/cos, as the C++ side does)
    hidden h_{l+1} = act(h_l W_l^T + b_l),  output y = h_L W_L^T + b_L
"""
import ctypes
import json
import math
import os
import re
import pathlib
import platform
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


class MlpTwin(torch.nn.Module):
    def __init__(self, dim, cond_dim, time_frequencies, time_scale, hidden, activation):
        super().__init__()
        self.dim, self.cond_dim = dim, cond_dim
        self.time_frequencies, self.time_scale = time_frequencies, time_scale
        widths = [dim + 2 * time_frequencies + cond_dim] + list(hidden) + [dim]
        act = {"tanh": torch.nn.Tanh, "silu": torch.nn.SiLU}[activation]
        layers = []
        for i in range(len(widths) - 1):
            layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i + 2 < len(widths):
                layers.append(act())
        self.net = torch.nn.Sequential(*layers)

    def time_features(self, t, dtype):
        tau = self.time_scale * float(t)
        f = self.time_frequencies
        feats = [math.sin(math.pi * 2.0**j * tau) for j in range(f)]
        feats += [math.cos(math.pi * 2.0**j * tau) for j in range(f)]
        return torch.tensor(feats, dtype=dtype)

    def forward(self, x, t):
        parts = [x]
        if self.time_frequencies > 0:
            parts.append(self.time_features(t, x.dtype).expand(x.shape[0], -1))
        if self.cond_dim > 0:
            raise NotImplementedError("conditioning is not used by the comparisons")
        return self.net(torch.cat(parts, dim=1))

    @staticmethod
    def load(path, dtype=torch.float64):
        tokens = pathlib.Path(path).read_text().split()
        assert tokens[0:2] == ["diffgrad-mlp", "1"], "not a diffgrad-mlp 1 file"
        it = iter(tokens[2:])
        cfg = {}
        for key in ("dim", "cond_dim", "time_frequencies", "time_scale", "activation"):
            assert next(it) == key
            cfg[key] = next(it)
        assert next(it) == "hidden"
        hidden = [int(next(it)) for _ in range(int(next(it)))]
        assert next(it) == "params"
        count = int(next(it))
        values = torch.tensor([float(next(it)) for _ in range(count)], dtype=torch.float64)
        m = MlpTwin(int(cfg["dim"]), int(cfg["cond_dim"]), int(cfg["time_frequencies"]),
                    float(cfg["time_scale"]), hidden, cfg["activation"]).to(torch.float64)
        offset = 0
        with torch.no_grad():
            for p in m.net.parameters():  # W_0, b_0, W_1, ...: the flat layout of models/mlp.hpp
                # (copied in float64: a float32 module would round the weights here)
                p.copy_(values[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        assert offset == count
        return m.to(dtype)


def write_matrix(path, m):
    m = m.detach().to(torch.float64).reshape(m.shape[0], -1)
    lines = [f"{m.shape[0]} {m.shape[1]}"]
    lines += [" ".join(repr(float(v)) for v in row) for row in m.tolist()]
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


def read_matrix(path):
    tokens = pathlib.Path(path).read_text().split()
    rows, cols = int(tokens[0]), int(tokens[1])
    return torch.tensor([float(v) for v in tokens[2:]], dtype=torch.float64).view(rows, cols)


def build_dir():
    return pathlib.Path(os.environ.get("DIFFGRAD_BUILD", ROOT / "build"))


def driver(name, *args):
    """Runs build/benchmarks/<name> with --key value args; returns its JSON line (or None)."""
    exe = build_dir() / "benchmarks" / name
    if not exe.exists():
        sys.exit(f"{exe} not found: build it first (cmake --build build --target {name}) or set "
                 "DIFFGRAD_BUILD to your build directory")
    cmd = [str(exe)] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"driver failed: {' '.join(cmd)}\n{proc.stderr}")
    out = proc.stdout.strip()
    return json.loads(out.splitlines()[-1]) if out else None


def proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


class PeakMeter:
    """Peak resident growth (VmHWM) from construction to growth_mib(): free heap pages are
    returned to the kernel first (glibc malloc_trim, as the C++ drivers do), then the peak is
    reset."""

    def __init__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = proc_status_bytes("VmRSS")

    def growth_mib(self):
        return (proc_status_bytes("VmHWM") - self.start) / 1048576.0


def in_child(script, *args):
    """Runs `python script --child args...` in a fresh process (fresh allocator, fresh peak);
    returns its last stdout line parsed as JSON."""
    cmd = [sys.executable, str(script), "--child"] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child failed: {' '.join(cmd)}\n{proc.stderr}")
    out = proc.stdout.strip()
    return json.loads(out.splitlines()[-1])


def environment():
    import diffusers
    try:
        import torchdiffeq
        tde = torchdiffeq.__version__
    except ImportError:
        tde = "not installed"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads; {torch_kernels()}), diffusers "
            f"{diffusers.__version__}, torchdiffeq {tde}; load average {load}")


def torch_kernels():
    """The BLAS torch was built with and the vector kernels it dispatches to, from its own
    build configuration, plus the BLAS-related environment variables that were set."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    capability = re.search(r"CPU capability usage: (\S+)", config)
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k.startswith(("OPENBLAS_", "MKL_", "OMP_"))]
    text = (f"BLAS {blas.group(1) if blas else 'unknown'}, kernels "
            f"{capability.group(1) if capability else 'unknown'}")
    return text + (f", env {' '.join(env)}" if env else ", no OPENBLAS_/MKL_/OMP_ variables set")


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
