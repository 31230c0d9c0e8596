// libFuzzer target: models::Mlp<double>::load (the text format of include/diffgrad/models/mlp.hpp).
//
// Invariant: load returns an Mlp or throws diffgrad::invalid_argument. A loaded network has
// param_size() equal to the count its header announced, evaluates on a one-row batch without
// crashing, and round-trips: save() then load() gives the same parameters bit for bit.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "diffgrad/models/mlp.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  diffgrad::fuzz::expect_valid_or_diffgrad_error("mlp_load", [&] {
    using Mlp = diffgrad::models::Mlp<double>;
    std::istringstream in(text);
    const Mlp net = Mlp::load(in);
    // Every parameter came from the input (>= 2 bytes each), so the network is small.
    if (net.param_size() < 1 || net.param_size() > static_cast<std::int64_t>(size))
      diffgrad::fuzz::finding("mlp_load", "param_size() inconsistent with the input");
    Mlp::state_type x = Mlp::state_type::Constant(1, net.dim(), 0.5), out;
    net.eps(x, 0.5, out);
    if (out.rows() != 1 || out.cols() != net.output_dim())
      diffgrad::fuzz::finding("mlp_load", "eps output of the wrong shape");
    std::ostringstream saved;
    net.save(saved);
    std::istringstream again(saved.str());
    const Mlp reloaded = Mlp::load(again);
    if (reloaded.param_size() != net.param_size())
      diffgrad::fuzz::finding("mlp_load", "save/load changed the parameter count");
    for (Eigen::Index i = 0; i < net.param_size(); ++i) {
      const double a = net.params()(i), b = reloaded.params()(i);
      if (!(a == b || (a != a && b != b)))
        diffgrad::fuzz::finding("mlp_load", "save/load changed a parameter value");
    }
  });
  return 0;
}
