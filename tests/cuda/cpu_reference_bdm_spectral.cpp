// CPU side of the BDM pixel-model CPU-vs-GPU cases (bdm_spectral_cases.hpp) and of the device
// DCT checks: gddim::ChannelDct, sample_bdm and gradient_bdm on EigenBackend<double> with the
// CPU Dirac mixture (the points, weights and logits of cpu_reference.cpp's MakeDirac).
#include <Eigen/Core>

#include <vector>

#include "bdm_spectral_cases.hpp"
#include "cpu_reference.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gddim/spectral_field.hpp"
#include "diffgrad/models/dirac_mixture.hpp"

namespace diffgrad::testing {

namespace {
struct EigenIO64 {
  using B = EigenBackend<double>;
  using State = B::state_type;
  using Vector = B::vector_type;
  State state(const B&, const std::vector<double>& v, int batch, int dim) const {
    State s(batch, dim);
    for (Eigen::Index i = 0; i < s.size(); ++i) s.data()[i] = v[static_cast<std::size_t>(i)];
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

struct MakeDiracCpu {
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
} // namespace

std::vector<double> cpu_channel_dct(const std::vector<double>& in, int batch, int channels,
                                    int height, int width, bool inverse) {
  const gddim::ChannelDct dct(height, width, channels);
  const EigenIO64 io;
  const gddim::ImageBatch x =
      io.state(EigenBackend<double>{}, in, batch, channels * height * width);
  gddim::ImageBatch y;
  if (inverse)
    dct.inverse(x, y);
  else
    dct.forward(x, y);
  return io.host(y);
}

Parts cpu_bdm_spectral_sample(int index) {
  return bdm_spectral_sample_case(EigenBackend<double>{}, EigenIO64{}, MakeDiracCpu{}, index);
}

Parts cpu_bdm_spectral_gradient(int index) {
  return bdm_spectral_gradient_case(EigenBackend<double>{}, EigenIO64{}, MakeDiracCpu{}, index);
}

} // namespace diffgrad::testing
