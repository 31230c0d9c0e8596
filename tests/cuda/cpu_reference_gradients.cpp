// CPU reference runs for the CUDA tests (see cpu_reference.hpp): gradients, inversion and
// continuous adjoints on EigenBackend with the CPU models. Host compiler only (Eigen stays out of
// the .cu files).
#include "cpu_reference_impl.hpp"

namespace diffgrad::testing {

using namespace cpu;

Parts cpu_gradient_gaussian(int index, const Problem& problem, const GradientSpec& g, Precision p) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return gradient_case(backend, io, MakeGaussian{}, index, problem, g);
  });
}

Parts cpu_gradient_dirac(int index, const Problem& problem, const GradientSpec& g) {
  return gradient_case(EigenBackend<double>{}, EigenIO<double>{}, MakeDirac{}, index, problem, g);
}

Parts cpu_gradient_mlp(int index, const Problem& problem, const GradientSpec& g, Precision p) {
  if (p == Precision::f64)
    return gradient_case(EigenBackend<double>{}, EigenIO<double>{}, MakeMlp<double>{}, index,
                         problem, g);
  return gradient_case(EigenBackend<float>{}, EigenIO<float>{}, MakeMlp<float>{}, index, problem,
                       g);
}

Parts cpu_inversion_gaussian(int index, const Problem& problem, Precision p) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return inversion_case(backend, io, MakeGaussian{}, index, problem);
  });
}

Parts cpu_continuous_gaussian(const Problem& problem, Precision p) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return continuous_case(backend, io, MakeGaussian{}, problem);
  });
}

Parts cpu_continuous_dirac(const Problem& problem) {
  return continuous_case(EigenBackend<double>{}, EigenIO<double>{}, MakeDirac{}, problem);
}

} // namespace diffgrad::testing
