// CPU reference runs for the CUDA tests (see cpu_reference.hpp): the cases of cases.hpp and the
// model evaluations on EigenBackend with the CPU models. Compiled by the host compiler only:
// Eigen stays out of the .cu files. (One translation unit: split in two it cost 40% more CPU
// time for a 7% shorter critical path.)
#include "cpu_reference.hpp"

#include <Eigen/Core>

#include <span>
#include <type_traits>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/models/dirac_mixture.hpp"
#include "diffgrad/models/mlp.hpp"
#include "sde_cases.hpp"
#include "structured_cases.hpp"

namespace diffgrad::testing {

namespace {

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

models::MlpConfig mlp_config(int dim, bool use_tanh) {
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

} // namespace

void add_part(Parts& parts, std::string name, std::vector<double> values) {
  parts.emplace_back(std::move(name), std::move(values));
}

std::vector<double> cpu_lincomb(Precision p, const std::vector<double>& coeffs,
                                const std::vector<std::vector<double>>& inputs, double noise_coeff,
                                std::uint64_t seed, std::uint64_t step, int batch, int dim,
                                std::uint64_t row_offset) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    using B = std::remove_cvref_t<decltype(backend)>;
    using State = typename B::state_type;
    std::vector<State> xs;
    for (const auto& v : inputs) xs.push_back(io.state(backend, v, batch, dim));
    std::vector<LinTerm<State>> terms;
    for (std::size_t k = 0; k < xs.size(); ++k) terms.push_back(LinTerm<State>{coeffs[k], &xs[k]});
    State out = backend.make_state(batch, dim);
    const NoiseTerm noise{noise_coeff, seed, step, row_offset};
    if (terms.empty())
      backend.lincomb(out, noise);
    else
      backend.lincomb(out, std::span<const LinTerm<State>>(terms), noise);
    return io.host(out);
  });
}

std::vector<double> cpu_lincomb_block2(Precision p, const std::vector<Block2>& coeffs,
                                       const std::vector<std::vector<double>>& inputs,
                                       const BasicNoiseTerm<Block2>& noise, int batch, int width) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    using B = std::remove_cvref_t<decltype(backend)>;
    using State = typename B::state_type;
    std::vector<State> xs;
    for (const auto& v : inputs) xs.push_back(io.state(backend, v, batch, width));
    std::vector<LinTerm<State, Block2>> terms;
    for (std::size_t k = 0; k < xs.size(); ++k) terms.push_back({coeffs[k], &xs[k]});
    State out = backend.make_state(batch, width);
    backend.lincomb(out, std::span<const LinTerm<State, Block2>>(terms), noise);
    return io.host(out);
  });
}

std::vector<double> cpu_lincomb_columns(Precision p, const std::vector<double>& table,
                                        const std::vector<ColumnSpec>& coeffs,
                                        const std::vector<std::vector<double>>& inputs,
                                        ColumnSpec noise, std::uint64_t seed, std::uint64_t step,
                                        std::uint64_t row_offset, int batch, int width) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    using B = std::remove_cvref_t<decltype(backend)>;
    using State = typename B::state_type;
    const auto backend_table = backend.make_coefficients(table);
    const auto coeff = [&](const ColumnSpec& c) {
      return ColumnCoeff{c.offset < 0 ? nullptr : B::coefficient_data(backend_table) + c.offset,
                         c.scale};
    };
    std::vector<State> xs;
    for (const auto& v : inputs) xs.push_back(io.state(backend, v, batch, width));
    std::vector<LinTerm<State, ColumnCoeff>> terms;
    for (std::size_t k = 0; k < xs.size(); ++k) terms.push_back({coeff(coeffs[k]), &xs[k]});
    State out = backend.make_state(batch, width);
    backend.lincomb(out, std::span<const LinTerm<State, ColumnCoeff>>(terms),
                    BasicNoiseTerm<ColumnCoeff>{coeff(noise), seed, step, row_offset});
    return io.host(out);
  });
}

double cpu_dot(Precision p, const std::vector<double>& a, const std::vector<double>& b, int batch,
               int dim) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return backend.dot(io.state(backend, a, batch, dim), io.state(backend, b, batch, dim));
  });
}

Parts cpu_structured(bool columns, const Problem& problem, Precision p) {
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return structured_case(backend, io, columns, problem);
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

Parts cpu_sde(bool exponential, const Problem& problem, Precision p) {
  const auto method = exponential ? sde::SdeMethod::exponential : sde::SdeMethod::euler_maruyama;
  return by_precision(p, [&](const auto& backend, const auto& io) {
    return sde_case(backend, io, method, problem);
  });
}

} // namespace diffgrad::testing
