#pragma once
// Shared by the CPU reference translation units (cpu_reference_*.cpp, host compiler only):
// EigenBackend IO and the CPU model factories matching the device ones in cuda_io.cuh.
#include <Eigen/Core>

#include <type_traits>

#include "cpu_reference.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/mlp.hpp"

namespace diffgrad::testing::cpu {

template <class Scalar> struct EigenIO {
  using B = EigenBackend<Scalar>;
  using State = typename B::state_type;
  using Vector = typename B::vector_type;
  State state(const B&, const std::vector<double>& v, int batch, int dim) const {
    State s(batch, dim);
    for (Eigen::Index i = 0; i < s.size(); ++i)
      s.data()[i] = static_cast<Scalar>(v[static_cast<std::size_t>(i)]);
    return s;
  }
  std::vector<double> host(const State& s) const {
    return std::vector<double>(s.data(), s.data() + s.size());
  }
  std::vector<double> host(const Vector& v) const {
    return std::vector<double>(v.data(), v.data() + v.size());
  }
};

using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct MakeDirac {
  template <class B, class IO>
  models::DiracMixture<double> operator()(const B&, const IO&, const Problem& p) const {
    const std::vector<double> pts = problem_points(kDiracPoints, p.dim);
    const std::vector<double> w = problem_weights(kDiracPoints);
    const std::vector<double> z = dirac_cond();
    models::DiracMixture<double> m(Eigen::Map<const RowMatrix>(pts.data(), kDiracPoints, p.dim),
                                   Eigen::Map<const Eigen::VectorXd>(w.data(), kDiracPoints));
    m.set_cond(Eigen::Map<const Eigen::VectorXd>(z.data(), kDiracPoints));
    return m;
  }
};

inline models::MlpConfig mlp_config(int dim, bool use_tanh) {
  models::MlpConfig c;
  c.dim = dim;
  c.cond_dim = kMlpCond;
  c.time_frequencies = 3;
  c.time_scale = 1.0;
  c.hidden = {16, 12};
  c.activation = use_tanh ? models::Activation::tanh : models::Activation::silu;
  return c;
}

template <class Scalar> models::Mlp<Scalar> make_mlp(int dim, bool use_tanh) {
  models::Mlp<Scalar> m(mlp_config(dim, use_tanh), kMlpSeed);
  const std::vector<double> z = mlp_cond();
  m.set_cond(Eigen::Map<const Eigen::VectorXd>(z.data(), kMlpCond).cast<Scalar>());
  return m;
}

template <class Scalar> struct MakeMlp {
  bool use_tanh = false;
  template <class B, class IO>
  models::Mlp<Scalar> operator()(const B&, const IO&, const Problem& p) const {
    return make_mlp<Scalar>(p.dim, use_tanh);
  }
};

template <class Run> auto by_precision(Precision p, Run&& run) {
  return p == Precision::f64 ? run(EigenBackend<double>{}, EigenIO<double>{})
                             : run(EigenBackend<float>{}, EigenIO<float>{});
}

} // namespace diffgrad::testing::cpu
