// CPU side of the gDDIM CPU-vs-GPU cases (gddim_cases.hpp) on EigenBackend<double>. A
// translation unit of its own: the gDDIM headers are large, and cpu_reference.cpp is already
// the critical path of the CUDA test build.
#include <Eigen/Core>

#include <vector>

#include "cpu_reference.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "gddim_cases.hpp"

namespace diffgrad::testing {

namespace {
struct EigenIO64 {
  using B = EigenBackend<double>;
  using State = B::state_type;
  State state(const B&, const std::vector<double>& v, int batch, int dim) const {
    State s(batch, dim);
    for (Eigen::Index i = 0; i < s.size(); ++i) s.data()[i] = v[static_cast<std::size_t>(i)];
    return s;
  }
  std::vector<double> host(const State& s) const {
    return std::vector<double>(s.data(), s.data() + s.size());
  }
};
} // namespace

Parts cpu_gddim(int index) { return gddim_case(EigenBackend<double>{}, EigenIO64{}, index); }

} // namespace diffgrad::testing
