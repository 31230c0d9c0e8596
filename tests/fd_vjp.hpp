#pragma once
// Tests only: a wrapper that gives any noise model a vector-Jacobian product by central
// finite differences (Richardson-extrapolated, error O(h^4)), so the discrete adjoint can be
// checked on models without an analytic VJP, and analytic VJPs can be checked against it.
// Rows of a batch are independent samples, so one perturbation of column j of every row
// gives column j of all B Jacobians at once: 4 d model calls for dx.
#include <Eigen/Core>
#include <functional>
#include <utility>

#include "diffgrad/concepts/model.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::testing {

template <class Model, class Scalar = double> class FdVjpModel {
public:
  using State = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  /// Reads / writes a flat vector of the wrapped model (its conditioning or parameters).
  struct Access {
    std::function<Vector(const Model&)> get;
    std::function<void(Model&, const Vector&)> set;
  };

  FdVjpModel(Model& model, double h, Access cond = {}, Access params = {})
      : model_(model), h_(h), cond_(std::move(cond)), params_(std::move(params)) {}

  std::int64_t cond_size() const { return cond_.get ? cond_.get(model_).size() : 0; }
  std::int64_t param_size() const { return params_.get ? params_.get(model_).size() : 0; }

  void eps(const State& x, const Node& n, State& out) const {
    if constexpr (NodeAwareNoiseModel<Model, State>)
      model_.eps(x, n, out);
    else
      model_.eps(x, n.model_t, out);
  }

  void vjp(const State& x, const Node& n, const State& a, State& dx, Vector* dcond,
           Vector* dparams) const {
    State xp = x, xm = x, ep(x.rows(), x.cols()), em(x.rows(), x.cols());
    dx.resize(x.rows(), x.cols());
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      // d/dx_j of <a_b, eps(x_b)> for every row b, by Richardson-extrapolated differences.
      const auto row_derivative = [&](double h) {
        xp.col(j) = x.col(j).array() + Scalar(h);
        xm.col(j) = x.col(j).array() - Scalar(h);
        eps(xp, n, ep);
        eps(xm, n, em);
        xp.col(j) = x.col(j);
        xm.col(j) = x.col(j);
        return ((ep - em).cwiseProduct(a).rowwise().sum() / Scalar(2 * h)).eval();
      };
      dx.col(j) = (Scalar(4) * row_derivative(h_ / 2) - row_derivative(h_)) / Scalar(3);
    }
    if (dcond) accumulate(cond_, x, n, a, *dcond);
    if (dparams) accumulate(params_, x, n, a, *dparams);
  }

private:
  // out_k += d/dp_k sum_b <a_b, eps(x_b; p)>.
  void accumulate(const Access& acc, const State& x, const Node& n, const State& a,
                  Vector& out) const {
    const Vector p0 = acc.get(model_);
    State e(x.rows(), x.cols());
    const auto value = [&](Eigen::Index k, double delta) {
      Vector p = p0;
      p(k) += Scalar(delta);
      acc.set(model_, p);
      eps(x, n, e);
      return e.cwiseProduct(a).template cast<double>().sum();
    };
    for (Eigen::Index k = 0; k < p0.size(); ++k) {
      const double d1 = (value(k, h_) - value(k, -h_)) / (2 * h_);
      const double d2 = (value(k, h_ / 2) - value(k, -h_ / 2)) / h_;
      out(k) += Scalar((4 * d2 - d1) / 3);
    }
    acc.set(model_, p0);
  }

  Model& model_;
  double h_;
  Access cond_, params_;
};

} // namespace diffgrad::testing
