#pragma once
// Independent long-double references for the CLD tests (tests/test_gddim_cld.cpp,
// tests/test_gddim_cld_sampler.cpp): the CLD drift and diffusion written from the parameters,
// not through the library; 2x2 long-double algebra; the transition matrix by a scaling-and-
// squaring Taylor series; and an adaptive Dormand-Prince 5(4) integrator.
#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <functional>

#include "diffgrad/gddim/cld_schedule.hpp"

namespace cld_reference {

using diffgrad::gddim::CldParams;
using diffgrad::gddim::Mat2;
using ld = long double;
using L2 = std::array<std::array<ld, 2>, 2>;
using V4 = std::array<ld, 4>;

inline Mat2 to_mat(const L2& a) {
  Mat2 m;
  m << static_cast<double>(a[0][0]), static_cast<double>(a[0][1]), static_cast<double>(a[1][0]),
      static_cast<double>(a[1][1]);
  return m;
}
inline L2 to_l2(const Mat2& m) { return {{{m(0, 0), m(0, 1)}, {m(1, 0), m(1, 1)}}}; }
inline L2 mul(const L2& a, const L2& b) {
  L2 c{};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) c[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j];
  return c;
}
inline L2 tr(const L2& a) { return {{{a[0][0], a[1][0]}, {a[0][1], a[1][1]}}}; }
inline L2 inv(const L2& a) {
  const ld d = a[0][0] * a[1][1] - a[0][1] * a[1][0];
  return {{{a[1][1] / d, -a[0][1] / d}, {-a[1][0] / d, a[0][0] / d}}};
}
inline V4 flat(const L2& a) { return {a[0][0], a[0][1], a[1][0], a[1][1]}; }
inline L2 unflat(const V4& y) { return {{{y[0], y[1]}, {y[2], y[3]}}}; }

/// The CLD coefficients written from the parameters (not through the library).
struct Ref {
  CldParams p;
  ld beta(ld t) const { return p.beta_0 + p.beta_1 * t; }
  ld damping() const { return 2 * std::sqrt(static_cast<ld>(p.mass)); }
  L2 F(ld t) const {
    const ld b = beta(t);
    return {{{0, b / p.mass}, {-b, -b * damping() / p.mass}}};
  }
  ld gg(ld t) const { return 2 * damping() * beta(t); } // (G G^T)_vv
  L2 sigma0() const { return {{{p.eps, 0}, {0, static_cast<ld>(p.gamma) * p.mass + p.eps}}}; }
  L2 r0() const {
    const L2 s = sigma0();
    const ld c = std::cos(static_cast<ld>(p.initial_angle)),
             s_ = std::sin(static_cast<ld>(p.initial_angle));
    const L2 l{{{std::sqrt(s[0][0]), 0}, {0, std::sqrt(s[1][1])}}};
    return mul(l, L2{{{c, -s_}, {s_, c}}});
  }
};

/// Psi = exp(int_s^t F) by scaling and squaring a Taylor series, long double. F is affine in t,
/// so int F = (t - s) (F(s) + F(t)) / 2 exactly; all F_t commute (multiples of one matrix).
inline L2 expm_ref(const Ref& ref, ld t, ld s) {
  L2 a = ref.F(s), b = ref.F(t);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) a[i][j] = 0.5L * (t - s) * (a[i][j] + b[i][j]);
  int sq = 0;
  ld nrm = std::fabs(a[0][0]) + std::fabs(a[0][1]) + std::fabs(a[1][0]) + std::fabs(a[1][1]);
  while (nrm > 0.125L) {
    nrm /= 2;
    ++sq;
  }
  const ld scale = std::ldexp(1.0L, -sq);
  for (auto& row : a)
    for (auto& v : row) v *= scale;
  L2 e{{{1, 0}, {0, 1}}}, term = e;
  for (int n = 1; n < 40; ++n) {
    term = mul(term, a);
    for (auto& row : term)
      for (auto& v : row) v /= n;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) e[i][j] += term[i][j];
  }
  for (int k = 0; k < sq; ++k) e = mul(e, e);
  return e;
}

/// Adaptive Dormand-Prince 5(4) in long double (per-component relative error control).
template <class V>
V dopri(const std::function<V(ld, const V&)>& f, ld t0, ld t1, V y, ld rtol = 1e-17L, ld atol = 1e-40L,
        ld h0 = 1e-9L) {
  static constexpr ld c[7] = {0, 1.0L / 5, 3.0L / 10, 4.0L / 5, 8.0L / 9, 1, 1};
  static constexpr ld a[7][6] = {
      {0, 0, 0, 0, 0, 0},
      {1.0L / 5, 0, 0, 0, 0, 0},
      {3.0L / 40, 9.0L / 40, 0, 0, 0, 0},
      {44.0L / 45, -56.0L / 15, 32.0L / 9, 0, 0, 0},
      {19372.0L / 6561, -25360.0L / 2187, 64448.0L / 6561, -212.0L / 729, 0, 0},
      {9017.0L / 3168, -355.0L / 33, 46732.0L / 5247, 49.0L / 176, -5103.0L / 18656, 0},
      {35.0L / 384, 0, 500.0L / 1113, 125.0L / 192, -2187.0L / 6784, 11.0L / 84}};
  static constexpr ld b4[7] = {
      5179.0L / 57600, 0,        7571.0L / 16695, 393.0L / 640, -92097.0L / 339200,
      187.0L / 2100,   1.0L / 40};
  const std::size_t n = y.size();
  const ld dir = t1 >= t0 ? 1 : -1, span = t1 - t0;
  ld e = 0, h = dir * std::min(h0, std::fabs(span));
  std::array<V, 7> k;
  while (dir * (span - e) > 0) {
    if (dir * (e + h - span) > 0) h = span - e;
    for (int s = 0; s < 7; ++s) {
      V ys = y;
      for (int j = 0; j < s; ++j)
        for (std::size_t i = 0; i < n; ++i) ys[i] += h * a[s][j] * k[j][i];
      k[s] = f(t0 + (e + c[s] * h), ys);
    }
    V y5 = y;
    ld err = 0;
    for (std::size_t i = 0; i < n; ++i) {
      ld d = 0;
      for (int s = 0; s < 7; ++s) {
        const ld b5 = s < 6 ? a[6][s] : 0;
        y5[i] += h * b5 * k[s][i];
        d += h * (b5 - b4[s]) * k[s][i];
      }
      err =
          std::max(err, std::fabs(d) / (atol + rtol * std::max(std::fabs(y[i]), std::fabs(y5[i]))));
    }
    if (err <= 1) {
      e += h;
      y = y5;
    }
    h *= err == 0 ? 5 : std::min<ld>(5, std::max<ld>(0.2L, 0.9L * std::pow(err, -0.2L)));
  }
  return y;
}

} // namespace cld_reference
