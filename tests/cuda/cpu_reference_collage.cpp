#include "cpu_reference_collage.hpp"

#include <Eigen/Core>

#include <cstddef>

#include "collage_cases.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/dirac_mixture.hpp"

namespace diffgrad::testing {
namespace {

template <class Scalar>
typename EigenBackend<Scalar>::state_type to_state(const std::vector<double>& values, int rows,
                                                   std::int64_t cols) {
  typename EigenBackend<Scalar>::state_type s(rows, cols);
  for (std::size_t i = 0; i < values.size(); ++i) s.data()[i] = static_cast<Scalar>(values[i]);
  return s;
}
template <class State> std::vector<double> to_host(const State& s) {
  std::vector<double> out(static_cast<std::size_t>(s.size()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(s.data()[i]);
  return out;
}

template <class Scalar>
std::vector<double> gather_as(const IndexMap& map, const std::vector<double>& big, int batch,
                              double scale, PieceWeights weights) {
  const EigenBackend<Scalar> backend;
  const auto x = to_state<Scalar>(big, batch, map.dim());
  typename EigenBackend<Scalar>::state_type pieces;
  backend.gather(x, backend.make_index_map(map), pieces, scale, weights);
  return to_host(pieces);
}
template <class Scalar>
std::vector<double> scatter_as(const IndexMap& map, const std::vector<double>& pieces,
                               const std::vector<double>& big, int batch, double scale,
                               PieceWeights weights) {
  const EigenBackend<Scalar> backend;
  const auto src = to_state<Scalar>(pieces, batch * static_cast<int>(map.pieces()), map.width());
  auto x = to_state<Scalar>(big, batch, map.dim());
  backend.scatter_add(src, backend.make_index_map(map), scale, x, weights);
  return to_host(x);
}

} // namespace

std::vector<double> cpu_gather(Precision p, const IndexMap& map, const std::vector<double>& big,
                               int batch, double scale, PieceWeights weights) {
  return p == Precision::f64 ? gather_as<double>(map, big, batch, scale, weights)
                             : gather_as<float>(map, big, batch, scale, weights);
}

std::vector<double> cpu_scatter_add(Precision p, const IndexMap& map,
                                    const std::vector<double>& pieces,
                                    const std::vector<double>& big, int batch, double scale,
                                    PieceWeights weights) {
  return p == Precision::f64 ? scatter_as<double>(map, pieces, big, batch, scale, weights)
                             : scatter_as<float>(map, pieces, big, batch, scale, weights);
}

Parts cpu_collage_case(const CollageProblem& cp) {
  using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const auto make_dirac = [](const EigenBackend<double>&, const std::vector<double>& points, int k,
                             int width, const std::vector<double>& weights,
                             const std::vector<double>& cond) {
    models::DiracMixture<double> m(Eigen::Map<const RowMatrix>(points.data(), k, width),
                                   Eigen::Map<const Eigen::VectorXd>(weights.data(), k));
    m.set_cond(Eigen::Map<const Eigen::VectorXd>(cond.data(), k));
    return m;
  };
  struct EigenIO64 {
    using State = EigenBackend<double>::state_type;
    State state(const EigenBackend<double>&, const std::vector<double>& v, int batch,
                int dim) const {
      return to_state<double>(v, batch, dim);
    }
    std::vector<double> host(const State& s) const { return to_host(s); }
  };
  return collage_case(EigenBackend<double>{}, EigenIO64{}, make_dirac, cp);
}

} // namespace diffgrad::testing
