// diffgrad::models::TorchNoiseModel (include/diffgrad/torch/): eps and every VJP of
// TorchScript modules against torch's own autograd in Python (reference values written by
// tools/torch/make_test_modules.py into tests/torch/data/), against central finite
// differences, zero-copy inputs, errors, and an exact gradient through 25 DDIM steps against
// torch autograd through the same loop in Python.
//
// Catch2 is included BEFORE the adapter on purpose: LibTorch's c10 headers define a glog-style
// CHECK macro, and the adapter's headers must restore Catch2's (checked by the [!shouldfail]
// case below: with torch's CHECK, CHECK(false) would abort the process instead).
#include <catch2/catch.hpp>

#include "diffgrad/torch/noise_model.hpp"

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/gradients/gradient.hpp"
#include "diffgrad/schedule/time_grid.hpp"
#include "diffgrad/schedule/vp_linear.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "fd_vjp.hpp"

using namespace diffgrad;
using models::TorchCondLayout;
using models::TorchModelOptions;
using models::TorchNoiseModel;
using models::TorchTimeInput;

namespace {

std::string data_path(const std::string& name) { return std::string(DIFFGRAD_TORCH_TEST_DATA) + "/" + name; }

/// The arrays of a reference file: "<name> <count> <values...>" per line.
struct Reference {
  std::map<std::string, std::vector<std::string>> tokens;

  explicit Reference(const std::string& file) {
    std::ifstream in(data_path(file));
    REQUIRE(in.good());
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream is(line);
      std::string name;
      std::size_t count = 0;
      is >> name >> count;
      std::vector<std::string> values(count);
      for (auto& v : values) is >> v;
      REQUIRE(!is.fail());
      tokens[name] = std::move(values);
    }
  }
  const std::vector<std::string>& strings(const std::string& name) const {
    const auto it = tokens.find(name);
    REQUIRE(it != tokens.end());
    return it->second;
  }
  template <class Scalar> Eigen::Matrix<Scalar, Eigen::Dynamic, 1> vector(const std::string& name) const {
    const auto& s = strings(name);
    Eigen::Matrix<Scalar, Eigen::Dynamic, 1> v(static_cast<Eigen::Index>(s.size()));
    for (std::size_t i = 0; i < s.size(); ++i) v(static_cast<Eigen::Index>(i)) = static_cast<Scalar>(std::stod(s[i]));
    return v;
  }
  template <class Scalar>
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>
  state(const std::string& name, Eigen::Index rows) const {
    const auto v = vector<Scalar>(name);
    Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(rows, v.size() / rows);
    std::copy_n(v.data(), v.size(), m.data());
    return m;
  }
};

/// max |a - b| / max |b|: a relative error on the scale of the reference.
template <class A, class B> double rel_err(const A& a, const B& b) {
  REQUIRE(a.size() == b.size());
  const double scale = b.template cast<double>().cwiseAbs().maxCoeff();
  return (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff() / scale;
}

template <class Scalar> c10::ScalarType dtype() { return torch_interop::dtype_of<Scalar>(); }

/// Loads convnet_<suffix>.pt with the reference file's conditioning set.
template <class Scalar>
TorchNoiseModel<Scalar> load_convnet(const std::string& suffix, const Reference& ref) {
  auto net = TorchNoiseModel<Scalar>::load(data_path("convnet_" + suffix + ".pt"),
                                           {.sample_shape = {1, 4, 4}});
  const auto c = ref.vector<Scalar>("cond");
  net.set_cond(torch::from_blob(const_cast<Scalar*>(c.data()), {2, 3},
                                torch::TensorOptions().dtype(dtype<Scalar>())).clone());
  return net;
}

/// eps and the three VJPs of a module against Python's values.
template <class Scalar>
void check_against_python(TorchNoiseModel<Scalar>& net, const Reference& ref, double t,
                          double tol, bool has_cond) {
  using State = typename TorchNoiseModel<Scalar>::state_type;
  using Vector = typename TorchNoiseModel<Scalar>::vector_type;
  const State x = ref.state<Scalar>("x", 2), a = ref.state<Scalar>("a", 2);
  REQUIRE(net.param_names() == ref.strings("param_names"));
  State out, dx;
  net.eps(x, t, out);
  const double e_eps = rel_err(out, ref.state<Scalar>("eps", 2));
  Vector dcond = Vector::Zero(net.cond_size()), dparams = Vector::Zero(net.param_size());
  net.vjp(x, t, a, dx, has_cond ? &dcond : nullptr, &dparams);
  const double e_dx = rel_err(dx, ref.state<Scalar>("dx", 2));
  const double e_dp = rel_err(dparams, ref.vector<Scalar>("dparams"));
  INFO("relative errors vs torch autograd in Python: eps " << e_eps << ", dx " << e_dx
                                                             << ", dparams " << e_dp);
  CHECK(e_eps <= tol);
  CHECK(e_dx <= tol);
  CHECK(e_dp <= tol);
  if (has_cond) {
    const double e_dc = rel_err(dcond, ref.vector<Scalar>("dcond"));
    INFO("dcond " << e_dc);
    CHECK(e_dc <= tol);
  }
  // dcond / dparams accumulate (+=), as for every diffgrad model.
  net.vjp(x, t, a, dx, has_cond ? &dcond : nullptr, &dparams);
  CHECK(rel_err(dparams, (2 * ref.vector<Scalar>("dparams")).eval()) <= tol);
}

} // namespace

TEST_CASE("torch adapter: Catch2's CHECK survives the LibTorch includes", "[torch][!shouldfail]") {
  CHECK(false);  // recorded as a failed Catch2 assertion (expected), not a torch abort
}

TEST_CASE("torch adapter: eps and VJPs of a TorchScript module match torch autograd in Python",
          "[torch]") {
  SECTION("float64, floating time and conditioning: <= 1e-12") {
    const Reference ref("convnet_f64.txt");
    auto net = load_convnet<double>("f64", ref);
    CHECK(net.cond_size() == 6);
    CHECK(net.param_size() == ref.vector<double>("dparams").size());
    check_against_python(net, ref, 0.7, 1e-12, true);
  }
  SECTION("float32 (the same weights, computed in float32 on both sides): <= 1e-5") {
    const Reference ref("convnet_f32.txt");
    auto net = load_convnet<float>("f32", ref);
    check_against_python(net, ref, 0.7, 1e-5, true);
  }
  SECTION("diffusers convention: integer timesteps, integer class labels, tuple output") {
    const Reference ref("classnet_f64.txt");
    auto net = TorchNoiseModel<double>::load(
        data_path("classnet_f64.pt"),
        {.sample_shape = {1, 4, 4}, .time_input = TorchTimeInput::integer});
    net.set_cond(torch::tensor({3, 7}, torch::kLong));
    CHECK(net.cond_size() == 0);  // labels are not differentiable
    check_against_python(net, ref, 417.0, 1e-12, false);
  }
}

TEST_CASE("torch adapter: VJPs match central finite differences (float64, <= 1e-7)", "[torch]") {
  using Vector = TorchNoiseModel<double>::vector_type;
  using State = TorchNoiseModel<double>::state_type;
  const Reference ref("convnet_f64.txt");
  auto net = load_convnet<double>("f64", ref);
  using Fd = testing::FdVjpModel<TorchNoiseModel<double>>;
  Fd fd(net, 1e-3,
        {[](const TorchNoiseModel<double>& m) { return m.cond_values(); },
         [](TorchNoiseModel<double>& m, const Vector& v) { m.set_cond_values(v); }},
        {[](const TorchNoiseModel<double>& m) { return m.params(); },
         [](TorchNoiseModel<double>& m, const Vector& v) { m.set_params(v); }});
  const State x = ref.state<double>("x", 2), a = ref.state<double>("a", 2);
  const Node n{0.5, 0.8, 0.6, 0.0, 0.31};  // only model_t reaches the network
  State dx, dx_fd;
  Vector dc = Vector::Zero(6), dc_fd = dc, dp = Vector::Zero(net.param_size()), dp_fd = dp;
  net.vjp(x, n.model_t, a, dx, &dc, &dp);
  fd.vjp(x, n, a, dx_fd, &dc_fd, &dp_fd);
  const double e_dx = rel_err(dx, dx_fd), e_dc = rel_err(dc, dc_fd), e_dp = rel_err(dp, dp_fd);
  INFO("relative errors vs finite differences: dx " << e_dx << ", dcond " << e_dc
                                                    << ", dparams " << e_dp);
  CHECK(e_dx <= 1e-7);
  CHECK(e_dc <= 1e-7);
  CHECK(e_dp <= 1e-7);
  // set_params / params round trip (the FD wrapper restored the original values).
  CHECK(rel_err(net.params(), fd.param_size() == net.param_size() ? net.params() : Vector()) == 0.0);
}

TEST_CASE("torch adapter: states reach the network without copies", "[torch]") {
  using State = TorchNoiseModel<double>::state_type;
  SECTION("TorchScript module: the input tensor aliases the state") {
    const Reference ref("convnet_f64.txt");
    auto net = load_convnet<double>("f64", ref);
    const State x = ref.state<double>("x", 2);
    State out;
    net.eps(x, 0.7, out);
    CHECK(net.last_input().data_ptr() == static_cast<const void*>(x.data()));
    CHECK(net.last_input().sizes() == c10::IntArrayRef({2, 1, 4, 4}));
    CHECK(net.last_input().strides() == c10::IntArrayRef({16, 16, 4, 1}));
    State dx;
    net.vjp(x, 0.7, ref.state<double>("a", 2), dx, nullptr, nullptr);
    CHECK(net.last_input().data_ptr() == static_cast<const void*>(x.data()));
  }
  SECTION("callable: x, the conditioning and the cotangent are the caller's memory") {
    const void* seen_x = nullptr;
    const void* seen_cond = nullptr;
    const void* seen_cotangent = nullptr;
    at::Tensor weight = torch::full({1}, 2.0, torch::kDouble);
    TorchNoiseModel<double> net(
        [&](const at::Tensor& x, const at::Tensor& t, const at::Tensor& c) {
          seen_x = x.data_ptr();
          seen_cond = c.data_ptr();
          at::Tensor y = weight * x + t.view({-1, 1, 1}) * c.view({-1, 1, 1});
          if (y.requires_grad())
            y.register_hook([&](const at::Tensor& g) { seen_cotangent = g.data_ptr(); });
          return y;
        },
        {{"weight", weight}}, {.sample_shape = {2, 2}});
    at::Tensor cond = torch::tensor({0.5, -1.0, 2.0}, torch::kDouble);
    net.set_cond(cond);
    State x = State::Random(3, 4), out, a = State::Random(3, 4), dx;
    net.eps(x, 0.25, out);
    CHECK(seen_x == x.data());
    CHECK(seen_cond == cond.data_ptr());
    State expected = 2.0 * x;
    for (int r = 0; r < 3; ++r) expected.row(r).array() += 0.25 * cond[r].item<double>();
    CHECK((out - expected).cwiseAbs().maxCoeff() == 0.0);
    TorchNoiseModel<double>::vector_type dc = TorchNoiseModel<double>::vector_type::Zero(3),
                                         dp = TorchNoiseModel<double>::vector_type::Zero(1);
    net.vjp(x, 0.25, a, dx, &dc, &dp);
    CHECK(seen_x == x.data());
    CHECK(seen_cotangent == a.data());
    CHECK(seen_cond == cond.data_ptr());  // a detached alias: same memory
    CHECK((dx - 2.0 * a).cwiseAbs().maxCoeff() == 0.0);
    CHECK(std::abs(dp(0) - x.cwiseProduct(a).sum()) <= 1e-14 * x.cwiseProduct(a).cwiseAbs().sum());
    for (int r = 0; r < 3; ++r) CHECK(std::abs(dc(r) - 0.25 * a.row(r).sum()) <= 1e-15 * 4);
    CHECK(!cond.requires_grad());  // the user's tensor is left as it was
  }
  SECTION("callable: 0-d time tensor, shared conditioning, flat layout") {
    std::vector<std::int64_t> time_dims, cond_sizes;
    TorchNoiseModel<float> net(
        [&](const at::Tensor& x, const at::Tensor& t, const at::Tensor& c) {
          time_dims.push_back(t.dim());
          cond_sizes.push_back(c.size(0));
          return x * t + c.sum();
        },
        {}, {.time_per_sample = false});
    net.set_cond(torch::tensor({1.0f, 2.0f}), TorchCondLayout::shared);
    TorchNoiseModel<float>::state_type out;
    for (int rows : {1, 3}) {  // any batch size: the shared tensor has no batch dimension
      const TorchNoiseModel<float>::state_type x = TorchNoiseModel<float>::state_type::Ones(rows, 5);
      net.eps(x, 0.5, out);
      CHECK(out.rows() == rows);
      CHECK((out.array() - 3.5f).abs().maxCoeff() == 0.0f);
      CHECK(net.last_input().sizes() == c10::IntArrayRef({rows, 5}));
    }
    CHECK(time_dims == std::vector<std::int64_t>{0, 0});
    CHECK(cond_sizes == std::vector<std::int64_t>{2, 2});
    CHECK(net.cond_size() == 2);
  }
}

TEST_CASE("torch adapter: bad input gives diffgrad errors naming the argument", "[torch]") {
  using State = TorchNoiseModel<double>::state_type;
  const Reference ref("convnet_f64.txt");
  auto net = load_convnet<double>("f64", ref);
  State out, dx;
  // State width against the module's layout.
  CHECK_THROWS_WITH(net.eps(State::Zero(2, 15), 0.5, out),
                    Catch::Contains("'x'") && Catch::Contains("[1, 4, 4]") &&
                        Catch::Contains("2 x 15"));
  // Cotangent shape.
  CHECK_THROWS_WITH(net.vjp(State::Zero(2, 16), 0.5, State::Zero(3, 16), dx, nullptr, nullptr),
                    Catch::Contains("'a'") && Catch::Contains("3 x 16"));
  // Conditioning: dtype, and batch size of a per-row tensor.
  CHECK_THROWS_WITH(net.set_cond(torch::zeros({2, 3}, torch::kFloat)),
                    Catch::Contains("'cond'") && Catch::Contains("Float"));
  CHECK_THROWS_AS(net.eps(State::Zero(3, 16), 0.5, out), diffgrad::invalid_argument);
  CHECK_THROWS_WITH(net.eps(State::Zero(3, 16), 0.5, out),
                    Catch::Contains("'cond'") && Catch::Contains("batch size 3"));
  // A module of another dtype than the state.
  CHECK_THROWS_WITH(TorchNoiseModel<double>::load(data_path("convnet_f32.pt"), {}),
                    Catch::Contains("'parameters'") && Catch::Contains("Float") &&
                        Catch::Contains("Double"));
  // Integer timesteps need an integer model time.
  auto labelled = TorchNoiseModel<double>::load(
      data_path("classnet_f64.pt"), {.sample_shape = {1, 4, 4}, .time_input = TorchTimeInput::integer});
  labelled.set_cond(torch::tensor({3, 7}, torch::kLong));
  CHECK_THROWS_WITH(labelled.eps(State::Zero(2, 16), 416.5, out),
                    Catch::Contains("'t'") && Catch::Contains("416.5"));
  // A layout whose extents' product overflows int64 (found by reading the adapter under
  // UBSan): refused at construction, naming the option, instead of overflowing per call.
  const auto identity = [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) {
    return x;
  };
  CHECK_THROWS_WITH(TorchNoiseModel<double>(identity, {},
                                            {.sample_shape = {std::int64_t{1} << 62, 4}}),
                    Catch::Contains("'options.sample_shape'") && Catch::Contains("int64"));
  CHECK_THROWS_WITH(TorchNoiseModel<double>(identity, {}, {.sample_shape = {4, 0}}),
                    Catch::Contains("'options.sample_shape'") && Catch::Contains("positive"));
  // Files.
  CHECK_THROWS_WITH(TorchNoiseModel<double>::load(data_path("missing.pt"), {}),
                    Catch::Contains("'path'") && Catch::Contains("missing.pt"));
  // Devices: Debian's LibTorch has no CUDA, so tensors on the "meta" device (shape and dtype,
  // no data) stand in for any non-CPU tensor.
  const auto meta = torch::TensorOptions().dtype(torch::kDouble).device(torch::kMeta);
  CHECK_THROWS_WITH(net.set_cond(torch::zeros({2, 3}, meta)),
                    Catch::Contains("'cond'") && Catch::Contains("CPU") && Catch::Contains("meta"));
  CHECK_THROWS_WITH(TorchNoiseModel<double>(
                        [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return x; },
                        {{"w", torch::zeros({2}, meta)}}, {}),
                    Catch::Contains("'parameters'") && Catch::Contains("'w' on meta"));
  TorchNoiseModel<double> elsewhere(
      [meta](const at::Tensor& x, const at::Tensor&, const at::Tensor&) {
        return torch::empty(x.sizes(), meta);
      },
      {}, {});
  CHECK_THROWS_WITH(elsewhere.eps(State::Zero(2, 4), 0.5, out),
                    Catch::Contains("module output") && Catch::Contains("CPU"));
  // A network whose output has the wrong shape.
  TorchNoiseModel<double> summing(
      [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) { return x.sum(1); }, {}, {});
  CHECK_THROWS_WITH(summing.eps(State::Zero(2, 4), 0.5, out),
                    Catch::Contains("module output") && Catch::Contains("[2]"));
}

TEST_CASE("torch adapter: torch's c10::Error becomes diffgrad::torch_error, message kept",
          "[torch]") {
  using State = TorchNoiseModel<double>::state_type;
  // What torch itself says for this op, read here from torch directly.
  std::string torch_message;
  try {
    (void)torch::zeros({2, 4}, torch::kDouble).matmul(torch::zeros({3, 3}, torch::kDouble));
  } catch (const c10::Error& e) {
    torch_message = e.what_without_backtrace();
  }
  REQUIRE(!torch_message.empty());
  TorchNoiseModel<double> broken(
      [](const at::Tensor& x, const at::Tensor&, const at::Tensor&) {
        return x.matmul(torch::zeros({3, 3}, torch::kDouble));
      },
      {}, {});
  State out;
  CHECK_THROWS_AS(broken.eps(State::Zero(2, 4), 0.5, out), diffgrad::torch_error);
  CHECK_THROWS_WITH(broken.eps(State::Zero(2, 4), 0.5, out),
                    Catch::Contains("TorchNoiseModel::eps") && Catch::Contains(torch_message));
  // A file that is not a TorchScript archive: torch's loader error, mapped.
  CHECK_THROWS_AS(TorchNoiseModel<double>::load(data_path("convnet_f64.txt"), {}),
                  diffgrad::torch_error);
  // A network called with a conditioning it cannot use: the error comes from inside the
  // TorchScript interpreter and keeps its text.
  const Reference ref("convnet_f64.txt");
  auto net = load_convnet<double>("f64", ref);
  net.set_cond(torch::zeros({2, 5}, torch::kDouble));
  CHECK_THROWS_WITH(net.eps(State::Zero(2, 16), 0.5, out),
                    Catch::Contains("TorchNoiseModel::eps: torch error: ") &&
                        Catch::Contains("2x5"));
}

TEST_CASE("torch adapter: exact gradient through 25 DDIM steps matches torch autograd in "
          "Python (float64, <= 1e-10)",
          "[torch]") {
  using Backend = EigenBackend<double>;
  const Reference ref("ddim_convnet_f64.txt");
  auto net = load_convnet<double>("f64", ref);
  REQUIRE(net.param_names() == ref.strings("param_names"));
  const int steps = static_cast<int>(ref.vector<double>("steps")(0));
  const VPLinearSchedule schedule;
  const auto times = uniform_t_grid(schedule, steps, 1.0, 1e-3);
  const auto nodes = make_nodes(schedule, times);
  // The grid itself, against the script's independent evaluation of the schedule.
  const auto py_times = ref.vector<double>("times"), py_alpha = ref.vector<double>("alpha"),
             py_sigma = ref.vector<double>("sigma");
  REQUIRE(nodes.size() == static_cast<std::size_t>(py_times.size()));
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    const auto k = static_cast<Eigen::Index>(i);
    CHECK(std::abs(nodes[i].t - py_times(k)) <= 1e-15);
    CHECK(std::abs(nodes[i].alpha - py_alpha(k)) <= 1e-15 * py_alpha(k));
    CHECK(std::abs(nodes[i].sigma - py_sigma(k)) <= 1e-14 * py_sigma(k));
    CHECK(nodes[i].model_t == nodes[i].t);  // VP linear: the network gets t itself
  }
  const Backend::state_type x_T = ref.state<double>("x_T", 2), w = ref.state<double>("w", 2);
  for (const auto memory : {MemoryMode::store_all(), MemoryMode::checkpoint(5)}) {
    const auto r = gradient(Ddim{}, Backend{}, schedule, std::span<const Node>(nodes), net, x_T, w,
                            {.memory = memory, .wrt_cond = true, .wrt_params = true});
    const double e_x0 = rel_err(r.x0, ref.state<double>("x0", 2));
    const double e_loss = std::abs(r.loss - ref.vector<double>("loss")(0)) /
                          std::abs(ref.vector<double>("loss")(0));
    const double e_gx = rel_err(r.grad_x, ref.state<double>("grad_x", 2));
    const double e_gc = rel_err(r.grad_cond, ref.vector<double>("grad_cond"));
    const double e_gp = rel_err(r.grad_params, ref.vector<double>("grad_params"));
    INFO("relative errors vs torch autograd through the Python DDIM loop: x0 "
         << e_x0 << ", loss " << e_loss << ", dL/dx_T " << e_gx << ", dL/dcond " << e_gc
         << ", dL/dtheta " << e_gp);
    CHECK(e_x0 <= 1e-10);
    CHECK(e_loss <= 1e-10);
    CHECK(e_gx <= 1e-10);
    CHECK(e_gc <= 1e-10);
    CHECK(e_gp <= 1e-10);
    CHECK(r.cost.vjps == steps);
  }
}
