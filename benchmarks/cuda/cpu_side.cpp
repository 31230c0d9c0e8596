// CPU half of bench_cuda_lincomb (see cpu_side.hpp).
#include "cpu_side.hpp"

#include <algorithm>
#include <chrono>
#include <span>
#include <vector>

#include "bench_schemes.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"

namespace diffgrad::bench {

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class Scalar> double lincomb_seconds(std::int64_t n, int terms, bool noise, int reps) {
  using B = EigenBackend<Scalar>;
  using State = typename B::state_type;
  const B backend;
  std::vector<State> x;
  for (int k = 0; k < terms; ++k) x.push_back(State::Constant(1, n, Scalar(0.5 + k)));
  State out = State::Zero(1, n);
  std::vector<LinTerm<State>> t;
  for (int k = 0; k < terms; ++k)
    t.push_back(LinTerm<State>{0.25 * (k + 1), &x[static_cast<std::size_t>(k)]});
  const NoiseTerm nt{noise ? 0.1 : 0.0, 7, 0};
  backend.lincomb(out, std::span<const LinTerm<State>>(t), nt); // warm-up (page faults)
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    backend.lincomb(out, std::span<const LinTerm<State>>(t), nt);
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return median(times);
}

template <class Scalar>
double step_seconds(int scheme, std::int64_t batch, std::int64_t dim, bool check_finite,
                    int steps) {
  using B = EigenBackend<Scalar>;
  const B backend;
  typename B::state_type x = B::state_type::Constant(batch, dim, Scalar(0.5));
  run_scheme_by_index(scheme, backend, x, 2, check_finite); // warm-up
  std::vector<double> times;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = Clock::now();
    run_scheme_by_index(scheme, backend, x, steps, check_finite);
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / steps);
  }
  return median(times);
}

} // namespace

double cpu_lincomb_seconds(std::int64_t n, int terms, bool noise, bool f64, int reps) {
  return f64 ? lincomb_seconds<double>(n, terms, noise, reps)
             : lincomb_seconds<float>(n, terms, noise, reps);
}

double cpu_step_seconds(int scheme, std::int64_t batch, std::int64_t dim, bool check_finite,
                        bool f64, int steps) {
  return f64 ? step_seconds<double>(scheme, batch, dim, check_finite, steps)
             : step_seconds<float>(scheme, batch, dim, check_finite, steps);
}

} // namespace diffgrad::bench
