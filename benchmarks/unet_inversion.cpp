// BDIA exact inversion of real digits through the learned UNet: round-trip error table.
//
//   unet_inversion [--model-dir data/models] [--digits data/digits/digits.txt]
//                  [--steps 10,20,50,100,200] [--gamma 1] [--threads 1]
//
// Ten real digits (the first image of each class in data/digits/digits.txt, pixels in
// [-1, 1]), each conditioned on its own label, are inverted to a latent with BdiaDdim(gamma)
// and regenerated with generate(); the table gives the relative round-trip error
// |x0' - x0|_F / |x0|_F in float64 (digits_unet_f64.pt) and float32 (digits_unet_f32.pt),
// and, for contrast, naive DDIM inversion (DdimInversion then Ddim on the same nodes).
// Nodes: N + 1 integer timesteps round(999 (N - i)/N), i = 0..N, on the model's training table
// (diffusers' DDPM linear betas, computed here in double: the table only has to be the
// same for inversion and regeneration); x0 is the state at timestep 0; the network gets
// the integer timestep.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "common/digits.hpp"
#include "compare/driver_io.hpp"
#include "diffgrad/backend/cpu/eigen_backend.hpp"
#include "diffgrad/compat/diffusers.hpp"
#include "diffgrad/inversion/bdia.hpp"
#include "diffgrad/inversion/engine.hpp"
#include "diffgrad/schedule/discrete.hpp"
#include "diffgrad/solvers/ddim.hpp"
#include "diffgrad/solvers/sampler.hpp"
#include "diffgrad/torch/noise_model.hpp"

#ifndef DIFFGRAD_MODELS_DIR
#define DIFFGRAD_MODELS_DIR "data/models"
#endif

namespace {

struct RoundTrip {
  double bdia = 0, naive = 0;
};

template <class Scalar>
RoundTrip round_trip(const std::string& model, const diffgrad::DiscreteSchedule& schedule,
                     const std::vector<diffgrad::Node>& nodes, const examples::Digits::Matrix& x0d,
                     const std::vector<std::int64_t>& labels, double gamma) {
  using Backend = diffgrad::EigenBackend<Scalar>;
  using State = typename Backend::state_type;
  using Net = diffgrad::models::TorchNoiseModel<Scalar>;
  Net net = Net::load(
      model, {.sample_shape = {1, 8, 8}, .time_input = diffgrad::models::TorchTimeInput::integer});
  net.set_cond(torch::tensor(labels, torch::kLong));
  const Backend backend;
  const State x0 = x0d.template cast<Scalar>();
  const std::span<const diffgrad::Node> span(nodes);
  const auto rel = [&](const State& x) {
    return static_cast<double>((x - x0).norm()) / static_cast<double>(x0.norm());
  };
  RoundTrip r;
  {
    const diffgrad::BdiaDdim bdia(gamma);
    diffgrad::LatentPair<State> latent;
    diffgrad::invert(bdia, backend, schedule, span, net, x0, latent);
    State x;
    diffgrad::generate(bdia, backend, schedule, span, net, latent, x);
    r.bdia = rel(x);
  }
  {
    std::vector<diffgrad::Node> reversed(nodes.rbegin(), nodes.rend());
    State x = x0;
    diffgrad::sample(diffgrad::DdimInversion(), backend, schedule,
                     std::span<const diffgrad::Node>(reversed), net, x);
    diffgrad::sample(diffgrad::Ddim(), backend, schedule, span, net, x);
    r.naive = rel(x);
  }
  return r;
}

} // namespace

int main(int argc, char** argv) {
  try {
    const driver::Args a(argc, argv);
    at::set_num_threads(a.integer("threads", 1));
    const std::string dir = a.str("model-dir", DIFFGRAD_MODELS_DIR);
    const double gamma = a.real("gamma", 1.0);
    const auto digits = examples::load_digits(a.str("digits", examples::default_digits_path()));
    const auto first = examples::subset_per_class(digits, 1); // one image per class, file order
    std::vector<std::int64_t> labels(first.labels.begin(), first.labels.end());

    const auto schedule = diffgrad::DiscreteSchedule::from_beta_schedule(
        diffgrad::BetaSchedule::linear, 1000, 1e-4, 0.02,
        diffgrad::DiscreteTimeInput::timestep_index);
    std::vector<int> step_counts;
    {
      std::stringstream s(a.str("steps", "10,20,50,100,200"));
      std::string item;
      while (std::getline(s, item, ',')) step_counts.push_back(std::stoi(item));
    }
    std::printf("BDIA-DDIM (gamma = %g) round trip of %d real digits (labels 0..9) through the "
                "learned UNet: |x0' - x0|_F / |x0|_F\n\n",
                gamma, static_cast<int>(labels.size()));
    std::printf("| N | BDIA float64 | BDIA float32 | naive DDIM inversion float64 | float32 |\n");
    std::printf("| --- | --- | --- | --- | --- |\n");
    for (int n : step_counts) {
      std::vector<diffgrad::Node> nodes;
      for (int i = 0; i <= n; ++i)
        nodes.push_back(diffgrad::compat::timestep_node(
            schedule, static_cast<int>(std::lround(999.0 * (n - i) / n))));
      const RoundTrip f64 = round_trip<double>(dir + "/digits_unet_f64.pt", schedule, nodes,
                                               first.images, labels, gamma);
      const RoundTrip f32 = round_trip<float>(dir + "/digits_unet_f32.pt", schedule, nodes,
                                              first.images, labels, gamma);
      std::printf("| %d | %.1e | %.1e | %.1e | %.1e |\n", n, f64.bdia, f32.bdia, f64.naive,
                  f32.naive);
      std::fflush(stdout);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unet_inversion: %s\n", e.what());
    return 1;
  }
}
