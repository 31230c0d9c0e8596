// CUDA backend benchmark: the fused update's bandwidth as a fraction of a device-to-device
// copy, and the speed-up over the CPU backend (EigenBackend, compiled with -march=native).
//
//   build/benchmarks/cuda/bench_cuda_lincomb                 # full run, markdown on stdout
//   build/benchmarks/cuda/bench_cuda_lincomb --quick         # sizes 1e5 and 1e6 only
//   build/benchmarks/cuda/bench_cuda_lincomb --no-cpu        # skip the CPU timings
//   build/benchmarks/cuda/bench_cuda_lincomb --out FILE.md   # also write the tables to FILE
//
// Table 1, per size n = B*d in {1e5, 1e6, 1e7, 1e8}, float and double:
//   copy       cudaMemcpyAsync device-to-device of n elements: 2 streams (1 read, 1 write)
//   lincomb k  out = sum of k c_j x_j: k + 1 streams (k = 2: a DDIM step, 4: DPM-Solver++ 3M
//              with its history, 2 + noise: an SDE step drawing Philox noise in the same pass)
//   bandwidth fraction = ((k + 1) n s / t_lincomb) / (2 n s / t_copy)   (goal >= 0.8)
//   speed-up = t_cpu / t_gpu for the same call on EigenBackend
// GPU times: cudaEvent around R back-to-back calls on one stream, median of 7 such runs
// (R >= 5, and R n >= 1e8 elements so each run lasts well over the launch latency).
// Table 2: one whole sampler step (sample() with a no-op model: step plan, fused lincomb,
// finite check of the model output) on the GPU vs the CPU, wall clock per step including the
// stream synchronisations the reductions need.
// Exits with 77 (and says so) when no CUDA device is visible.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "bench_schemes.hpp"
#include "cpu_side.hpp"
#include "diffgrad/backend/cuda/cuda_backend.cuh"

namespace {

using namespace diffgrad;
namespace dg = diffgrad::gpu;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Seconds per call of f() on `stream`: median over 7 runs of `calls` back-to-back calls.
template <class F> double gpu_seconds(cudaStream_t stream, int calls, F&& f) {
  cudaEvent_t start, stop;
  dg::check(cudaEventCreate(&start), "bench", "cudaEventCreate");
  dg::check(cudaEventCreate(&stop), "bench", "cudaEventCreate");
  f(); // warm-up
  std::vector<double> times;
  for (int run = 0; run < 7; ++run) {
    dg::check(cudaEventRecord(start, stream), "bench", "cudaEventRecord");
    for (int c = 0; c < calls; ++c) f();
    dg::check(cudaEventRecord(stop, stream), "bench", "cudaEventRecord");
    dg::check(cudaEventSynchronize(stop), "bench", "cudaEventSynchronize");
    float ms = 0.0f;
    dg::check(cudaEventElapsedTime(&ms, start, stop), "bench", "cudaEventElapsedTime");
    times.push_back(static_cast<double>(ms) * 1e-3 / calls);
  }
  dg::check(cudaEventDestroy(start), "bench", "cudaEventDestroy");
  dg::check(cudaEventDestroy(stop), "bench", "cudaEventDestroy");
  return median(times);
}

struct Options {
  bool quick = false;
  bool cpu = true;
  std::string out;
};

template <class Scalar>
void lincomb_rows(std::int64_t n, const Options& opt, cudaStream_t stream, std::ostream& os) {
  using State = dg::DeviceState<Scalar>;
  const dg::CudaBackend<Scalar> backend(stream);
  std::vector<State> x;
  for (int k = 0; k < 4; ++k) {
    x.push_back(backend.make_state(1, n));
    backend.fill(x.back(), 0.5 + k);
  }
  State out = backend.make_state(1, n), copy_dst = backend.make_state(1, n);
  const int calls = static_cast<int>(std::max<std::int64_t>(5, 100000000 / n));
  const double s = sizeof(Scalar);
  const double t_copy = gpu_seconds(stream, calls, [&] {
    dg::check(cudaMemcpyAsync(copy_dst.data(), x[0].data(),
                              static_cast<std::size_t>(n) * sizeof(Scalar),
                              cudaMemcpyDeviceToDevice, stream),
              "bench", "cudaMemcpyAsync");
  });
  const double bw_copy = 2.0 * n * s / t_copy;
  struct Case {
    const char* name;
    int terms;
    bool noise;
  };
  for (const Case c :
       {Case{"lincomb 1 (copy kernel)", 1, false}, Case{"lincomb 2 (DDIM)", 2, false},
        Case{"lincomb 4 (3M + history)", 4, false}, Case{"lincomb 2 + noise (SDE)", 2, true}}) {
    std::vector<LinTerm<State>> terms;
    for (int k = 0; k < c.terms; ++k)
      terms.push_back(LinTerm<State>{0.25 * (k + 1), &x[static_cast<std::size_t>(k)]});
    const NoiseTerm noise{c.noise ? 0.1 : 0.0, 7, 0};
    const double t = gpu_seconds(stream, calls, [&] {
      backend.lincomb(out, std::span<const LinTerm<State>>(terms), noise);
    });
    const double bw = (c.terms + 1) * n * s / t;
    std::ostringstream cpu;
    if (opt.cpu) {
      const double t_cpu = bench::cpu_lincomb_seconds(n, c.terms, c.noise, sizeof(Scalar) == 8,
                                                      n >= 10000000 ? 3 : 9);
      cpu.precision(3);
      cpu << std::fixed << t_cpu * 1e3 << " | " << t_cpu / t << "x";
    } else {
      cpu << "- | -";
    }
    char row[512];
    std::snprintf(row, sizeof row, "| %s | %.0e | %s | %.4f | %.0f | %.0f | %.2f | %s |\n",
                  sizeof(Scalar) == 8 ? "double" : "float", static_cast<double>(n), c.name, t * 1e3,
                  bw * 1e-9, bw_copy * 1e-9, bw / bw_copy, cpu.str().c_str());
    os << row;
    std::fputs(row, stdout);
    std::fflush(stdout);
  }
}

template <class Scalar>
void step_rows(std::int64_t batch, std::int64_t dim, const Options& opt, cudaStream_t stream,
               std::ostream& os) {
  const dg::CudaBackend<Scalar> backend(stream);
  const int steps = 20;
  for (int scheme = 0; scheme < 3; ++scheme)
    for (bool check_finite : {true, false}) {
      auto x = backend.make_state(batch, dim);
      backend.fill(x, 0.5);
      bench::run_scheme_by_index(scheme, backend, x, 2, check_finite); // warm-up
      backend.synchronize();
      std::vector<double> times;
      for (int r = 0; r < 3; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        bench::run_scheme_by_index(scheme, backend, x, steps, check_finite);
        backend.synchronize();
        times.push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps);
      }
      const double t = median(times);
      std::ostringstream cpu;
      if (opt.cpu && batch * dim <= 10000000) {
        const double t_cpu =
            bench::cpu_step_seconds(scheme, batch, dim, check_finite, sizeof(Scalar) == 8, steps);
        cpu.precision(3);
        cpu << std::fixed << t_cpu * 1e3 << " | " << t_cpu / t << "x";
      } else {
        cpu << "- | -";
      }
      char row[512];
      std::snprintf(row, sizeof row, "| %s | %lld x %lld | %s | %s | %.4f | %s |\n",
                    sizeof(Scalar) == 8 ? "double" : "float", static_cast<long long>(batch),
                    static_cast<long long>(dim), bench::scheme_name(scheme),
                    check_finite ? "on" : "off", t * 1e3, cpu.str().c_str());
      os << row;
      std::fputs(row, stdout);
      std::fflush(stdout);
    }
}

} // namespace

int main(int argc, char* argv[]) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0)
      opt.quick = true;
    else if (std::strcmp(argv[i], "--no-cpu") == 0)
      opt.cpu = false;
    else if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc)
      opt.out = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--no-cpu] [--out FILE.md]\n", argv[0]);
      return 2;
    }
  }
  if (dg::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device visible; nothing measured.\n");
    return 77;
  }
  int device = 0;
  dg::check(cudaGetDevice(&device), "bench", "cudaGetDevice");
  cudaDeviceProp prop{};
  dg::check(cudaGetDeviceProperties(&prop, device), "bench", "cudaGetDeviceProperties");
  cudaStream_t stream;
  dg::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "bench", "cudaStreamCreate");

  std::ostringstream md;
  md << "Device: " << prop.name << " (" << prop.multiProcessorCount << " SMs, "
     << prop.totalGlobalMem / (1024 * 1024 * 1024) << " GiB), CUDA runtime " << CUDART_VERSION
     << "\n\n";
  const char* header1 =
      "| type | n = B*d | operation | GPU ms | GPU GB/s | copy GB/s | fraction of copy | CPU ms | "
      "speed-up |\n|---|---|---|---|---|---|---|---|---|\n";
  std::fputs(md.str().c_str(), stdout);
  std::fputs(header1, stdout);
  md << header1;
  std::vector<std::int64_t> sizes{100000, 1000000, 10000000, 100000000};
  if (opt.quick) sizes.resize(2);
  for (std::int64_t n : sizes) {
    lincomb_rows<float>(n, opt, stream, md);
    lincomb_rows<double>(n, opt, stream, md);
  }
  const char* header2 = "\n| type | B x d | scheme | finite check | GPU ms/step | CPU ms/step | "
                        "speed-up |\n|---|---|---|---|---|---|---|\n";
  std::fputs(header2, stdout);
  md << header2;
  std::vector<std::int64_t> batches{100, 1000, 10000, 100000};
  if (opt.quick) batches.resize(2);
  for (std::int64_t b : batches) {
    step_rows<float>(b, 1000, opt, stream, md);
    step_rows<double>(b, 1000, opt, stream, md);
  }
  dg::check(cudaStreamDestroy(stream), "bench", "cudaStreamDestroy");
  if (!opt.out.empty()) {
    std::ofstream f(opt.out);
    f << md.str();
  }
  return 0;
}
