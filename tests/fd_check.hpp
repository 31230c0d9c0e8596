#pragma once
// Finite-difference checks of vector-Jacobian products, for any test that has a VJP.
//
// Everything works on flat double vectors: wrap the code under test as
//   f(in, out)      out = F(in)             (F: R^n -> R^m, out is resized by f)
//   vjp(in, w)      returns J(in)^T w       (J = dF/din, m x n)
// and call check_vjp. Two numbers come back:
//   fd_error           the classical check: <J^T w, v> against the fourth-order central
//                      difference of phi(s) = <w, F(x + s v)> at s = 0 (stencil -2h..2h) along
//                      random unit directions v, as one relative error over all directions;
//                      1e-7 is the project's bar.
//   dot_product_error  the dot-product test <w, J v> = <J^T w, v> for random pairs (w, v),
//                      with J v from Ridders' extrapolated central differences (accurate to
//                      ~1e-13 on smooth functions), so the bar can be ~1e-11..1e-12.
// When an exact JVP is available (an analytic Jacobian), dot_product_error_exact gives the
// dot-product test at rounding level.
// Helpers at the end turn row-major Eigen states (B x d) into flat vectors and back.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "diffgrad/detail/philox.hpp"

namespace diffgrad::testing {

using FlatFunction = std::function<void(const Eigen::VectorXd&, Eigen::VectorXd&)>;
using FlatVjp = std::function<Eigen::VectorXd(const Eigen::VectorXd&, const Eigen::VectorXd&)>;
using FlatJvp = FlatVjp;  ///< jvp(in, v) returns J(in) v

struct FdOptions {
  int directions = 6;        ///< random directions (and (w, v) pairs for the dot-product test)
  double step = 1e-4;        ///< central-difference step for fd_error, times max(1, |x|_inf)
  double ridders_step = 0.05;///< initial step of Ridders' extrapolation, times max(1, |x|_inf)
  std::uint64_t seed = 7;    ///< Philox seed of the random directions
};

struct VjpCheck {
  double fd_error = 0.0;           ///< relative error of <J^T w, v> vs central differences
  double dot_product_error = 0.0;  ///< max relative |<w, J v> - <J^T w, v>| over the pairs
};

/// A deterministic standard-normal vector (stream `stream` of `seed`).
inline Eigen::VectorXd random_vector(Eigen::Index size, std::uint64_t seed, std::uint64_t stream) {
  Eigen::VectorXd v(size);
  for (Eigen::Index i = 0; i < size; ++i)
    v(i) = diffgrad::detail::gaussian(seed, stream, static_cast<std::uint64_t>(i));
  return v;
}

inline Eigen::VectorXd evaluate(const FlatFunction& f, const Eigen::VectorXd& x) {
  Eigen::VectorXd out;
  f(x, out);
  return out;
}

/// J(x) v by Ridders' method: central differences at steps h, h/1.4, h/1.4^2, ... with
/// Neville extrapolation to h -> 0, keeping the estimate with the smallest error estimate
/// (Numerical Recipes' dfridr, on vectors with the max-norm).
inline Eigen::VectorXd ridders_jvp(const FlatFunction& f, const Eigen::VectorXd& x,
                                   const Eigen::VectorXd& v, double h0) {
  constexpr int kTable = 12;
  constexpr double kShrink = 1.4, kShrink2 = kShrink * kShrink, kSafe = 2.0;
  std::vector<std::vector<Eigen::VectorXd>> a(kTable, std::vector<Eigen::VectorXd>(kTable));
  const auto central = [&](double h) {
    return ((evaluate(f, x + h * v) - evaluate(f, x - h * v)) / (2.0 * h)).eval();
  };
  double h = h0;
  a[0][0] = central(h);
  Eigen::VectorXd best = a[0][0];
  double best_err = std::numeric_limits<double>::infinity();
  for (int i = 1; i < kTable; ++i) {
    h /= kShrink;
    a[0][static_cast<std::size_t>(i)] = central(h);
    double fac = kShrink2;
    for (int j = 1; j <= i; ++j) {
      const auto& prev = a[static_cast<std::size_t>(j - 1)];
      a[static_cast<std::size_t>(j)][static_cast<std::size_t>(i)] =
          (prev[static_cast<std::size_t>(i)] * fac - prev[static_cast<std::size_t>(i - 1)]) /
          (fac - 1.0);
      fac *= kShrink2;
      const auto& cur = a[static_cast<std::size_t>(j)][static_cast<std::size_t>(i)];
      const double err =
          std::max((cur - prev[static_cast<std::size_t>(i)]).lpNorm<Eigen::Infinity>(),
                   (cur - prev[static_cast<std::size_t>(i - 1)]).lpNorm<Eigen::Infinity>());
      if (err <= best_err) {
        best_err = err;
        best = cur;
      }
    }
    const auto& diag = a[static_cast<std::size_t>(i)][static_cast<std::size_t>(i)];
    const auto& prev_diag = a[static_cast<std::size_t>(i - 1)][static_cast<std::size_t>(i - 1)];
    if ((diag - prev_diag).lpNorm<Eigen::Infinity>() >= kSafe * best_err) break;
  }
  return best;
}

/// The classical check and the dot-product test of `vjp` against `f` at `x`.
inline VjpCheck check_vjp(const FlatFunction& f, const FlatVjp& vjp, const Eigen::VectorXd& x,
                          const FdOptions& options = {}) {
  const Eigen::VectorXd y = evaluate(f, x);
  const double scale = std::max(1.0, x.lpNorm<Eigen::Infinity>());
  VjpCheck result;
  // Classical: one cotangent w, several directions; compare the vectors of projections.
  const Eigen::VectorXd w = random_vector(y.size(), options.seed, 0);
  const Eigen::VectorXd g = vjp(x, w);
  Eigen::VectorXd by_vjp(options.directions), by_fd(options.directions);
  const double h = options.step * scale;
  for (int k = 0; k < options.directions; ++k) {
    Eigen::VectorXd v = random_vector(x.size(), options.seed, 100 + static_cast<std::uint64_t>(k));
    v /= v.norm();
    by_vjp(k) = g.dot(v);
    const auto phi = [&](double s) { return w.dot(evaluate(f, x + s * v)); };
    by_fd(k) = (8.0 * (phi(h) - phi(-h)) - (phi(2.0 * h) - phi(-2.0 * h))) / (12.0 * h);
  }
  result.fd_error = (by_fd - by_vjp).norm() / std::max(by_vjp.norm(), 1e-300);
  // Dot-product test: fresh (w, v) pairs, J v by Ridders' extrapolation.
  for (int k = 0; k < options.directions; ++k) {
    const auto stream = 1000 + 2 * static_cast<std::uint64_t>(k);
    const Eigen::VectorXd wk = random_vector(y.size(), options.seed, stream);
    Eigen::VectorXd v = random_vector(x.size(), options.seed, stream + 1);
    v /= v.norm();
    const double lhs = wk.dot(ridders_jvp(f, x, v, options.ridders_step * scale));
    const double rhs = vjp(x, wk).dot(v);
    const double err = std::abs(lhs - rhs) / std::max({std::abs(lhs), std::abs(rhs), 1e-300});
    result.dot_product_error = std::max(result.dot_product_error, err);
  }
  return result;
}

/// Dot-product test against an exact JVP: max relative |<w, J v> - <J^T w, v>|.
inline double dot_product_error_exact(const FlatJvp& jvp, const FlatVjp& vjp,
                                      const Eigen::VectorXd& x, Eigen::Index out_size,
                                      const FdOptions& options = {}) {
  double worst = 0.0;
  for (int k = 0; k < options.directions; ++k) {
    const auto stream = 5000 + 2 * static_cast<std::uint64_t>(k);
    const Eigen::VectorXd w = random_vector(out_size, options.seed, stream);
    const Eigen::VectorXd v = random_vector(x.size(), options.seed, stream + 1);
    const double lhs = w.dot(jvp(x, v));
    const double rhs = vjp(x, w).dot(v);
    worst = std::max(worst, std::abs(lhs - rhs) / std::max({std::abs(lhs), std::abs(rhs), 1e-300}));
  }
  return worst;
}

// ---- row-major states <-> flat vectors --------------------------------------------------

using RowMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Row-major flattening (sample after sample), the layout of EigenBackend's state_type.
template <class Derived> Eigen::VectorXd flatten(const Eigen::MatrixBase<Derived>& m) {
  const RowMatrixXd row = m.template cast<double>();
  return Eigen::Map<const Eigen::VectorXd>(row.data(), row.size());
}

inline RowMatrixXd unflatten(const Eigen::VectorXd& v, Eigen::Index rows, Eigen::Index cols) {
  return Eigen::Map<const RowMatrixXd>(v.data(), rows, cols);
}

/// VJP checks of a model at one time w.r.t. its state, its conditioning and its parameters.
struct ModelVjpChecks {
  VjpCheck x, cond, params;
};

/// `eval(x, out)` evaluates the model (eps or velocity) at a fixed time; `vjp(x, a, dx, dcond,
/// dparams)` is its VJP there. `cond` / `params` point at the model's own vectors (null: skip);
/// they are perturbed during the check and restored afterwards. Double states only.
template <class StateExpr, class Vector, class Eval, class Vjp>
ModelVjpChecks check_model_vjp(Eval&& eval, Vjp&& vjp, const StateExpr& x_in, Vector* cond,
                               Vector* params, const FdOptions& options = {}) {
  using State = typename StateExpr::PlainObject;
  const State x = x_in;
  const auto rows = x.rows(), cols = x.cols();
  const auto as_state = [&](const Eigen::VectorXd& v) { return State(unflatten(v, rows, cols)); };
  ModelVjpChecks out;
  out.x = check_vjp(
      [&](const Eigen::VectorXd& in, Eigen::VectorXd& y) {
        State e;
        eval(as_state(in), e);
        y = flatten(e);
      },
      [&](const Eigen::VectorXd& in, const Eigen::VectorXd& w) {
        State dx;
        vjp(as_state(in), as_state(w), dx, static_cast<Vector*>(nullptr),
            static_cast<Vector*>(nullptr));
        return flatten(dx);
      },
      flatten(x), options);
  const auto check_vector = [&](Vector* target, bool is_cond) {
    const Vector saved = *target;
    VjpCheck c = check_vjp(
        [&](const Eigen::VectorXd& in, Eigen::VectorXd& y) {
          *target = in;
          State e;
          eval(x, e);
          y = flatten(e);
          *target = saved;
        },
        [&](const Eigen::VectorXd& in, const Eigen::VectorXd& w) {
          *target = in;
          State dx;
          Vector g = Vector::Zero(in.size());
          vjp(x, as_state(w), dx, is_cond ? &g : nullptr, is_cond ? nullptr : &g);
          *target = saved;
          return Eigen::VectorXd(g);
        },
        Eigen::VectorXd(saved), options);
    return c;
  };
  if (cond && cond->size() > 0) out.cond = check_vector(cond, true);
  if (params && params->size() > 0) out.params = check_vector(params, false);
  return out;
}

} // namespace diffgrad::testing
