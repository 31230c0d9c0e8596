// CPU reference runs for the CUDA tests (see cpu_reference.hpp): samplers, backend operations and
// model evaluations on EigenBackend with the CPU models. Host compiler only (Eigen stays out of the
// .cu files).
#include "cpu_reference_impl.hpp"

namespace diffgrad::testing {

using namespace cpu;

void add_part(Parts& parts, std::string name, std::vector<double> values) {
  parts.emplace_back(std::move(name), std::move(values));
}

std::vector<double> cpu_lincomb(Precision p, const std::vector<double>& coeffs,
                                const std::vector<std::vector<double>>& inputs, double noise_coeff,
                                std::uint64_t seed, std::uint64_t step, int batch, int dim) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    using B = std::remove_cvref_t<decltype(backend)>;
    using State = typename B::state_type;
    std::vector<State> xs;
    for (const auto& v : inputs) xs.push_back(io.state(backend, v, batch, dim));
    std::vector<LinTerm<State>> terms;
    for (std::size_t k = 0; k < xs.size(); ++k) terms.push_back(LinTerm<State>{coeffs[k], &xs[k]});
    State out = backend.make_state(batch, dim);
    if (terms.empty())
      backend.lincomb(out, NoiseTerm{noise_coeff, seed, step});
    else
      backend.lincomb(out, std::span<const LinTerm<State>>(terms),
                      NoiseTerm{noise_coeff, seed, step});
    return io.host(out);
  });
}

double cpu_dot(Precision p, const std::vector<double>& a, const std::vector<double>& b, int batch,
               int dim) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return backend.dot(io.state(backend, a, batch, dim), io.state(backend, b, batch, dim));
  });
}

Parts cpu_sample_gaussian(int index, const Problem& problem, Precision p) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return sample_case(backend, io, MakeGaussian{}, index, problem);
  });
}

Parts cpu_sample_dirac(int index, const Problem& problem) {
  return sample_case(EigenBackend<double>{}, EigenIO<double>{}, MakeDirac{}, index, problem);
}

Parts cpu_sample_mlp(int index, const Problem& problem, Precision p, bool use_tanh) {
  if (p == Precision::f64)
    return sample_case(EigenBackend<double>{}, EigenIO<double>{}, MakeMlp<double>{use_tanh}, index,
                       problem);
  return sample_case(EigenBackend<float>{}, EigenIO<float>{}, MakeMlp<float>{use_tanh}, index,
                     problem);
}

Parts cpu_dirac_eval(const std::vector<double>& x, const std::vector<double>& a, int batch, int dim,
                     const Node& n) {
  const EigenIO<double> io;
  const EigenBackend<double> backend;
  Problem p;
  p.dim = dim;
  auto model = MakeDirac{}(backend, io, p);
  const auto xs = io.state(backend, x, batch, dim), as = io.state(backend, a, batch, dim);
  RowMatrix out(batch, dim), dx(batch, dim);
  Parts parts;
  model.eps(xs, n, out);
  add_part(parts, "eps", io.host(out));
  model.x0_hat(xs, n, out);
  add_part(parts, "x0_hat", io.host(out));
  Eigen::VectorXd dcond = Eigen::VectorXd::Zero(model.cond_size());
  Eigen::VectorXd dparams = Eigen::VectorXd::Zero(model.param_size());
  model.vjp(xs, n, as, dx, &dcond, &dparams);
  add_part(parts, "vjp dx", io.host(dx));
  add_part(parts, "vjp dcond", io.host(dcond));
  add_part(parts, "vjp dparams", io.host(dparams));
  return parts;
}

std::vector<double> cpu_mlp_params(int dim, bool use_tanh) {
  const auto m = make_mlp<double>(dim, use_tanh);
  return std::vector<double>(m.params().data(), m.params().data() + m.param_size());
}

Parts cpu_mlp_eval(Precision p, const std::vector<double>& x, const std::vector<double>& a,
                   int batch, int dim, double t, bool use_tanh) {
  const auto run = [&](auto tag) {
    using Scalar = decltype(tag);
    const EigenIO<Scalar> io;
    const EigenBackend<Scalar> backend;
    const auto model = make_mlp<Scalar>(dim, use_tanh);
    const auto xs = io.state(backend, x, batch, dim), as = io.state(backend, a, batch, dim);
    typename EigenBackend<Scalar>::state_type out, dx;
    Parts parts;
    model.eps(xs, t, out);
    add_part(parts, "eps", io.host(out));
    typename EigenBackend<Scalar>::vector_type dcond =
        EigenBackend<Scalar>::vector_type::Zero(model.cond_size());
    typename EigenBackend<Scalar>::vector_type dparams =
        EigenBackend<Scalar>::vector_type::Zero(model.param_size());
    model.vjp(xs, t, as, dx, &dcond, &dparams);
    add_part(parts, "vjp dx", io.host(dx));
    add_part(parts, "vjp dcond", io.host(dcond));
    add_part(parts, "vjp dparams", io.host(dparams));
    return parts;
  };
  return p == Precision::f64 ? run(double{}) : run(float{});
}

} // namespace diffgrad::testing
