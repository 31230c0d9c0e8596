#pragma once
// CPU backend on Eigen. The batched state is a row-major B x d matrix (B samples of
// dimension d). Every update is one Eigen expression, so Eigen's evaluator fuses it into a
// single vectorised loop with no temporaries: `lincomb` is the whole solver step.
#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <span>
#include <utility>

#include "diffgrad/backend/lincomb_term.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/philox.hpp"

namespace diffgrad {

template <class Scalar> class EigenBackend {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "diffgrad::EigenBackend supports float and double");

public:
  using scalar_type = Scalar;
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  using index_type = Eigen::Index;

  /// Allocates a zero-initialised B x d state. Never called inside a step loop.
  state_type make_state(index_type batch, index_type dim) const {
    return state_type::Zero(batch, dim);
  }
  vector_type make_vector(index_type size) const { return vector_type::Zero(size); }

  static index_type batch(const state_type& x) { return x.rows(); }
  static index_type dim(const state_type& x) { return x.cols(); }

  /// out = sum_k c_k x_k (+ noise), one fused pass. `out` may alias any input.
  template <class... States>
  void lincomb(state_type& out, LinTerm<States>... terms) const {
    static_assert((std::is_same_v<States, state_type> && ...), "lincomb: terms must be states");
    out.noalias() = (... + (Scalar(terms.coeff) * *terms.vec));
  }

  template <class... States>
  void lincomb(state_type& out, NoiseTerm noise, LinTerm<States>... terms) const {
    const auto cols = out.cols();
    const auto xi = state_type::NullaryExpr(out.rows(), cols, [=](index_type r, index_type c) {
      return Scalar(noise.coeff *
                    detail::gaussian(noise.seed, noise.step,
                                     static_cast<std::uint64_t>(r * cols + c)));
    });
    if constexpr (sizeof...(States) == 0) {
      out = xi;
    } else {
      out.noalias() = (... + (Scalar(terms.coeff) * *terms.vec)) + xi;
    }
  }

  /// Runtime arity (1..kMaxLincombTerms terms): dispatches to the fused fixed-arity form.
  void lincomb(state_type& out, std::span<const LinTerm<state_type>> terms,
               NoiseTerm noise = {}) const {
    if (terms.empty() || terms.size() > static_cast<std::size_t>(kMaxLincombTerms))
      detail::throw_argument("EigenBackend::lincomb", "terms",
                             detail::concat("1..", kMaxLincombTerms, " terms"), terms.size());
    dispatch(out, terms, noise, std::make_index_sequence<kMaxLincombTerms>{});
  }

  void copy(state_type& dst, const state_type& src) const { dst = src; }
  void fill(state_type& dst, double value) const { dst.setConstant(Scalar(value)); }

  /// Sum over the whole batch, accumulated in double.
  double dot(const state_type& a, const state_type& b) const {
    return a.template cast<double>().cwiseProduct(b.template cast<double>()).sum();
  }
  double squared_norm(const state_type& a) const { return dot(a, a); }
  /// x * 0 is 0 for finite x and NaN for NaN/Inf, so the sum is 0 exactly when every entry is
  /// finite (it cannot overflow). One vectorised read pass: Eigen's allFinite() is a scalar
  /// loop that ran ~40x slower than a copy (benchmarks/RESULTS.md, per-step overhead).
  bool all_finite(const state_type& a) const { return (a.array() * Scalar(0)).sum() == Scalar(0); }

  /// Writes xi(seed, step) into out (for tests and for storing the noise a step used).
  void gaussian(state_type& out, std::uint64_t seed, std::uint64_t step) const {
    lincomb(out, NoiseTerm{1.0, seed, step});
  }

private:
  template <std::size_t... Is>
  void dispatch(state_type& out, std::span<const LinTerm<state_type>> terms, NoiseTerm noise,
                std::index_sequence<Is...>) const {
    // One branch per arity; each is a single fused Eigen expression.
    const bool dispatched =
        ((terms.size() == Is + 1
              ? (call_fixed(out, terms, noise, std::make_index_sequence<Is + 1>{}), true)
              : false) ||
         ...);
    (void)dispatched;
  }
  template <std::size_t... Js>
  void call_fixed(state_type& out, std::span<const LinTerm<state_type>> terms, NoiseTerm noise,
                  std::index_sequence<Js...>) const {
    if (noise.coeff != 0.0)
      lincomb(out, noise, terms[Js]...);
    else
      lincomb(out, terms[Js]...);
  }
};

} // namespace diffgrad
