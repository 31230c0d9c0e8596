// Known-answer test of the learned model committed with the repository
// (data/models/digits_unet_f64.pt and digits_unet_f32.pt: a class-conditional diffusers
// UNet2DModel eps-network on the 8x8 digits, TorchScript traced; data/models/README.md).
// Through diffgrad's LibTorch adapter (models::TorchNoiseModel), eps of a fixed batch at
// four timesteps and a float64 VJP must equal the values torch computed in Python
// (data/models/digits_unet_kat.txt, written by tools/torch/make_digits_unet_kat.py):
//   float64: max |eps - eps_ref| <= 1e-10 max |eps_ref|   (the same LibTorch build evaluates
//            the same graph: the difference is expected to be 0 or a few ulps)
//   float32: max |eps - eps_ref| <= 1e-5 max |eps_ref|
// A negative control shows the comparison is sharp: another class label or timestep moves eps
// by far more than the tolerance.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "diffgrad/torch/noise_model.hpp"

namespace {

std::string models_dir() {
#ifdef DIFFGRAD_MODELS_DIR
  return DIFFGRAD_MODELS_DIR;
#else
  // tests/torch/ -> data/models/ (the absolute source path the compiler was given)
  return (std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "data" /
          "models")
      .string();
#endif
}

struct Kat {
  int batch = 0;
  std::vector<std::int64_t> labels;
  std::vector<double> x, w;
  std::map<std::string, std::vector<double>> values; // "eps_f64 999" -> B*64 values
};

Kat read_kat() {
  const std::string path = models_dir() + "/digits_unet_kat.txt";
  std::ifstream in(path);
  REQUIRE(in.good());
  Kat k;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream s(line);
    std::string key;
    s >> key;
    if (key == "batch") {
      s >> k.batch;
      continue;
    }
    if (key == "class_labels") {
      std::int64_t v = 0;
      while (s >> v) k.labels.push_back(v);
      continue;
    }
    if (key.rfind("eps_", 0) == 0 || key.rfind("vjp_", 0) == 0) {
      std::string timestep;
      s >> timestep;
      key += " " + timestep;
    }
    std::vector<double> v;
    double d = 0;
    while (s >> d) v.push_back(d);
    if (key == "x")
      k.x = v;
    else if (key == "w")
      k.w = v;
    else
      k.values[key] = v;
  }
  REQUIRE(k.batch == 4);
  REQUIRE(k.labels.size() == 4);
  REQUIRE(k.x.size() == 4 * 64);
  REQUIRE(k.w.size() == 4 * 64);
  return k;
}

template <class Scalar>
using State = typename diffgrad::models::TorchNoiseModel<Scalar>::state_type;

template <class Scalar> State<Scalar> to_state(const std::vector<double>& v, int batch) {
  State<Scalar> m(batch, 64);
  for (int i = 0; i < batch * 64; ++i)
    m.data()[i] = static_cast<Scalar>(v[static_cast<std::size_t>(i)]);
  return m;
}

/// max |got - ref| / max |ref| over all entries.
template <class Scalar> double max_rel(const State<Scalar>& got, const std::vector<double>& ref) {
  REQUIRE(static_cast<std::size_t>(got.size()) == ref.size());
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(got.data()[i]) - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return diff / scale;
}

template <class Scalar> diffgrad::models::TorchNoiseModel<Scalar> load_net(const char* file) {
  using Net = diffgrad::models::TorchNoiseModel<Scalar>;
  diffgrad::models::TorchModelOptions options;
  options.sample_shape = {1, 8, 8};
  options.time_input = diffgrad::models::TorchTimeInput::integer;
  return Net::load(models_dir() + "/" + file, options);
}

template <class Scalar> void check_eps(const char* file, const char* tag, double tolerance) {
  const Kat kat = read_kat();
  auto net = load_net<Scalar>(file);
  CHECK(net.param_size() == 164689);
  CHECK(net.param_names().front() == "unet.conv_in.weight");
  net.set_cond(torch::tensor(kat.labels, torch::kLong));
  const State<Scalar> x = to_state<Scalar>(kat.x, kat.batch);
  State<Scalar> out;
  for (int k : {999, 500, 7, 0}) {
    const std::string key = std::string("eps_") + tag + " " + std::to_string(k);
    REQUIRE(kat.values.count(key) == 1);
    net.eps(x, static_cast<double>(k), out);
    const double err = max_rel<Scalar>(out, kat.values.at(key));
    INFO(key << ": max relative difference " << err);
    CHECK(err <= tolerance);
  }
  // Negative controls: the pinned values tell labels and timesteps apart far above both
  // tolerances (an off-by-one timestep moves eps by 3.7e-3, reversed labels by 0.45, measured
  // in Python), so a wrong label order or timestep convention would fail above.
  net.eps(x, 501.0, out);
  CHECK(max_rel<Scalar>(out, kat.values.at(std::string("eps_") + tag + " 500")) > 1e-3);
  std::vector<std::int64_t> other = kat.labels;
  std::reverse(other.begin(), other.end());
  net.set_cond(torch::tensor(other, torch::kLong));
  net.eps(x, 500.0, out);
  CHECK(max_rel<Scalar>(out, kat.values.at(std::string("eps_") + tag + " 500")) > 1e-1);
}

} // namespace

TEST_CASE("digits UNet: float64 eps of the committed model equals torch's values (<= 1e-10)",
          "[torch][digits_unet]") {
  check_eps<double>("digits_unet_f64.pt", "f64", 1e-10);
}

TEST_CASE("digits UNet: float32 eps of the committed model equals torch's values (<= 1e-5)",
          "[torch][digits_unet]") {
  check_eps<float>("digits_unet_f32.pt", "f32", 1e-5);
}

TEST_CASE("digits UNet: float64 VJP wrt the input equals torch autograd's (<= 1e-10)",
          "[torch][digits_unet]") {
  const Kat kat = read_kat();
  auto net = load_net<double>("digits_unet_f64.pt");
  net.set_cond(torch::tensor(kat.labels, torch::kLong));
  const State<double> x = to_state<double>(kat.x, kat.batch);
  const State<double> w = to_state<double>(kat.w, kat.batch);
  State<double> dx;
  net.vjp(x, 500.0, w, dx, nullptr, nullptr);
  const double err = max_rel<double>(dx, kat.values.at("vjp_x_f64 500"));
  INFO("max relative difference " << err);
  CHECK(err <= 1e-10);
}
