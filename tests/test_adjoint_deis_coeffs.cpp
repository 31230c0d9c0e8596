// Cancellation-sensitive coefficients against long-double references written here (power
// series where the closed forms cancel), from steps of 1e-10 in lambda up to steps of order 1:
//   - phi_1, phi_2, phi_3 (coeffs/exponential.hpp), which DPM-Solver(++) and AdjointDEIS-2M use;
//   - sigma_t (e^h - 1) and alpha_t (e^-h - 1);
//   - every coefficient of AdjointDEIS-1 and -2M (both slope weights, ODE and SDE weights) and of
//     the re-solved state (coeffs/adjoint_deis.hpp).
// Each coefficient is compared with the exact value of its formula at the node values it is
// given, to a few units in the last place: a coefficient that subtracts nearly equal numbers
// (e^h - 1 formed as exp(h) - 1, or a phi recurrence used too close to h = 0) loses digits in
// proportion to 1/|h| and fails by orders of magnitude.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "diffgrad/coeffs/adjoint_deis.hpp"
#include "diffgrad/coeffs/exponential.hpp"

using namespace diffgrad;

namespace {

using ld = long double;

/// sum_{n >= k} h^n / n! (the tail of e^h from the k-th term on) in long double: the series
/// where it converges fast, expm1 minus the leading terms elsewhere (|h| >= 1/2 cancels by at
/// most a few bits of long double's 64).
ld exp_tail(ld h, int k) {
  if (std::fabs(h) < 0.5L) {
    ld term = 1, sum = 0;
    for (int n = 1; n <= 60; ++n) {
      term *= h / n;
      if (n >= k) sum += term;
    }
    return k == 0 ? sum + 1 : sum;
  }
  ld r = std::expm1(h) + 1, term = 1;
  for (int n = 0; n < k; ++n) {
    r -= term;
    term *= h / (n + 1);
  }
  return r;
}

/// phi_k(h) = sum_{n >= 0} h^n / (n + k)! = exp_tail(h, k) / h^k.
ld phi_ref(int k, ld h) {
  if (std::fabs(h) < 0.5L) {
    ld sum = 0, fact = 1;
    for (int j = 2; j <= k; ++j) fact *= j;
    ld term = 1 / fact; // h^0 / k!
    for (int n = 0; n <= 60; ++n) {
      sum += term;
      term *= h / (n + k + 1);
    }
    return sum;
  }
  return exp_tail(h, k) / std::pow(h, k);
}

double rel_err(double got, ld want) {
  if (want == 0) return std::fabs(static_cast<ld>(got)) == 0 ? 0.0 : INFINITY;
  return static_cast<double>(std::fabs((static_cast<ld>(got) - want) / want));
}

/// A VP node with half log-SNR exactly lambda: alpha^2 = sigmoid(2 lambda), sigma^2 = 1 - alpha^2.
Node vp_node(double lambda) {
  Node n;
  n.lambda = lambda;
  n.alpha = std::sqrt(1.0 / (1.0 + std::exp(-2.0 * lambda)));
  n.sigma = std::sqrt(1.0 / (1.0 + std::exp(2.0 * lambda)));
  n.t = n.model_t = 0.5;
  return n;
}

/// Steps from vanishing to order one, both signs where the function takes both.
const std::vector<double> kSteps{1e-10, 3e-9,   1e-8,   1e-7, 1e-6, 1e-5, 1e-4, 9e-4, 1.1e-3, 5e-3,
                                 1e-2,  1.9e-2, 2.1e-2, 0.1,  0.5,  0.99, 1.01, 2.0,  7.0};

// Measured worst relative errors on this sweep: phi_1 1.1e-16, phi_2 2.3e-16, phi_3 5.6e-16,
// AdjointDEIS-2M coefficients 4.4e-16. Before the phi functions summed their power series for
// every |h| <= 1 (they switched from a short Taylor polynomial to the cancelling recurrences at
// |h| = 1e-3 and 2e-2) the worst were phi_2 2.9e-13 (h = 1.1e-3), phi_3 1.1e-12 (h = 2.1e-2)
// and an AdjointDEIS-2M slope weight 2.7e-13 (h = -1.1e-3).
constexpr double kPhiTol = 1e-15;  // ~4.5 ulps
constexpr double kCoefTol = 2e-15; // a coefficient is a product of up to ~6 rounded factors

} // namespace

TEST_CASE("phi_1, phi_2, phi_3 are accurate to a few ulps for every step size",
          "[coeffs][phi][cancellation]") {
  double worst[3] = {0, 0, 0};
  for (double magnitude : kSteps)
    for (double h : {magnitude, -magnitude}) {
      const double got[3] = {coeffs::phi1(h), coeffs::phi2(h), coeffs::phi3(h)};
      for (int k = 1; k <= 3; ++k) {
        const double e = rel_err(got[k - 1], phi_ref(k, h));
        worst[k - 1] = std::max(worst[k - 1], e);
        INFO("phi_" << k << "(" << h << "): relative error " << e);
        CHECK(e <= kPhiTol);
      }
    }
  INFO("worst relative errors: phi1 " << worst[0] << ", phi2 " << worst[1] << ", phi3 "
                                      << worst[2]);
  CHECK(std::max({worst[0], worst[1], worst[2]}) <= kPhiTol);
  // The limits the callers rely on: phi_k(0) = 1/k!, phi_k(-inf) = 0.
  CHECK(coeffs::phi1(0.0) == 1.0);
  CHECK(coeffs::phi2(0.0) == 0.5);
  CHECK(coeffs::phi3(0.0) == Approx(1.0 / 6.0).epsilon(1e-16));
  CHECK(coeffs::phi1(-INFINITY) == 0.0);
  CHECK(coeffs::phi2(-INFINITY) == 0.0);
  CHECK(coeffs::phi3(-INFINITY) == 0.0);
}

TEST_CASE("sigma_t (e^h - 1) and alpha_t (e^-h - 1) at vanishing steps", "[coeffs][cancellation]") {
  for (double lambda_s : {-3.0, 0.3, 4.0})
    for (double magnitude : kSteps) {
      const Node s = vp_node(lambda_s), t = vp_node(lambda_s + magnitude);
      const ld h = static_cast<ld>(t.lambda) - static_cast<ld>(s.lambda); // exact
      INFO("lambda_s " << lambda_s << ", h " << static_cast<double>(h));
      CHECK(rel_err(coeffs::sigma_expm1(s, t), t.sigma * exp_tail(h, 1)) <= kPhiTol);
      CHECK(rel_err(coeffs::alpha_expm1_neg(s, t), t.alpha * exp_tail(-h, 1)) <= kPhiTol);
    }
}

TEST_CASE("AdjointDEIS-1 and -2M coefficients at vanishing and finite steps",
          "[coeffs][adjoint_deis][cancellation]") {
  // One adjoint step t -> s (s noisier, h = lambda_s - lambda_t < 0) with the previous point r
  // (cleaner, h_prev = lambda_r - lambda_t > 0). Reference (derived in coeffs/adjoint_deis.hpp):
  //   I0 = sigma_s (e^h - 1);  J = sigma_s (e^h - 1 - h) / h_prev   (exact-integral weights)
  //                            J = sigma_s (e^h - 1) h / (2 h_prev) (the paper's weights)
  //   adjoint = alpha_t / alpha_s,  vjp_t = w alpha_t^2 (I0 - J) / alpha_s^2,
  //   vjp_r = w alpha_r^2 J / alpha_s^2,  integral_t = w alpha_t (I0 - J) / alpha_s,
  //   integral_r = w alpha_r J / alpha_s;  re-solved state: (alpha_s / alpha_t, -(I0 - J), -J).
  double worst = 0;
  for (double lambda_t : {-2.0, 0.4, 3.5})
    for (double magnitude : kSteps)
      for (double ratio : {1.0, 2.5, 0.3}) {
        const Node t = vp_node(lambda_t), s = vp_node(lambda_t - magnitude),
                   r = vp_node(lambda_t + ratio * magnitude);
        const ld h = static_cast<ld>(s.lambda) - static_cast<ld>(t.lambda);
        const ld h_prev = static_cast<ld>(r.lambda) - static_cast<ld>(t.lambda);
        const ld as = s.alpha, at = t.alpha, ar = r.alpha;
        const ld I0 = s.sigma * exp_tail(h, 1);
        for (auto weights :
             {AdjointMultistepWeights::exact_integral, AdjointMultistepWeights::paper})
          for (double w : {1.0, 2.0}) {
            const bool exact = weights == AdjointMultistepWeights::exact_integral;
            const ld J = exact ? s.sigma * exp_tail(h, 2) / h_prev
                               : s.sigma * exp_tail(h, 1) * h / (2 * h_prev);
            const auto c = coeffs::adjoint_deis_2m(r, t, s, weights, w);
            const double errs[] = {rel_err(c.adjoint, at / as),
                                   rel_err(c.vjp_t, w * at * at * (I0 - J) / (as * as)),
                                   rel_err(c.vjp_r, w * ar * ar * J / (as * as)),
                                   rel_err(c.integral_t, w * at * (I0 - J) / as),
                                   rel_err(c.integral_r, w * ar * J / as)};
            const auto b = coeffs::backward_state_2m(r, t, s, weights);
            const double state_errs[] = {rel_err(b.x, as / at), rel_err(b.eps_t, -(I0 - J)),
                                         rel_err(b.eps_r, -J)};
            INFO("lambda_t " << lambda_t << ", h " << static_cast<double>(h) << ", h_prev "
                             << static_cast<double>(h_prev) << ", "
                             << (exact ? "exact-integral" : "paper") << " weights, w " << w);
            for (int k = 0; k < 5; ++k) {
              INFO("AdjointStepCoeffs field " << k << ": relative error " << errs[k]);
              CHECK(errs[k] <= kCoefTol);
              worst = std::max(worst, errs[k]);
            }
            for (int k = 0; k < 3; ++k) {
              INFO("BackwardStateCoeffs field " << k << ": relative error " << state_errs[k]);
              CHECK(state_errs[k] <= kCoefTol);
            }
          }
        // First order: the same with J = 0 and no r.
        const auto c1 = coeffs::adjoint_deis_1(t, s, 2.0);
        CHECK(rel_err(c1.vjp_t, 2 * at * at * I0 / (as * as)) <= kCoefTol);
        CHECK(rel_err(c1.integral_t, 2 * at * I0 / as) <= kCoefTol);
        CHECK(c1.vjp_r == 0.0);
        const auto b1 = coeffs::backward_state_1(t, s);
        CHECK(rel_err(b1.eps_t, -I0) <= kCoefTol);
      }
  INFO("worst relative error of an AdjointDEIS-2M coefficient: " << worst);
  CHECK(worst <= kCoefTol);
}
