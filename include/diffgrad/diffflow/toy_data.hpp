#pragma once
// 2-D toy data sets for DiffFlow's examples and tables, drawn from Philox keyed by
// (seed, draw, sample index): any batch of any draw is reproducible on its own.
//   two_rings:    concentric rings of radii 1 and 2 (scaled by `scale`), equal mass, Gaussian
//                 radial profile of std `width`
//   checkerboard: uniform on the 8 dark squares of a 4 x 4 board on [-2, 2]^2 (times `scale`)
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>

#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/philox.hpp"

namespace diffgrad::diffflow {

enum class Toy { two_rings, checkerboard };

inline const char* toy_name(Toy toy) { return toy == Toy::two_rings ? "two_rings" : "checkerboard"; }

inline Toy parse_toy(const std::string& name) {
  if (name == "two_rings" || name == "rings") return Toy::two_rings;
  if (name == "checkerboard") return Toy::checkerboard;
  diffgrad::detail::throw_argument("parse_toy", "name", "'two_rings' or 'checkerboard'", name);
}

struct ToyOptions {
  Toy toy = Toy::two_rings;
  double scale = 1.0; ///< multiplies every point
  double width = 0.08; ///< two_rings: radial std (before scale)
};

/// Writes `batch` samples (rows of out, resized to batch x 2) for (seed, draw).
template <class State>
void draw_toy(const ToyOptions& o, Eigen::Index batch, std::uint64_t seed, std::uint64_t draw,
              State& out) {
  diffgrad::detail::require(batch >= 1, "draw_toy", "batch", "at least 1 sample",
                            static_cast<double>(batch));
  out.resize(batch, 2);
  for (Eigen::Index b = 0; b < batch; ++b) {
    const auto r = diffgrad::detail::philox4x32_10(
        diffgrad::detail::Philox4x32{{static_cast<std::uint32_t>(b),
                                      static_cast<std::uint32_t>(static_cast<std::uint64_t>(b) >> 32),
                                      static_cast<std::uint32_t>(draw), 0x746f7900u /* "toy" */ ^
                                                                            static_cast<std::uint32_t>(draw >> 32)}},
        seed);
    const double u0 = diffgrad::detail::uniform_open0(r.v[0], r.v[1]);
    const double u1 = diffgrad::detail::uniform_open0(r.v[2], r.v[3]);
    double x = 0, y = 0;
    if (o.toy == Toy::two_rings) {
      const double radius = (b % 2 == 0 ? 1.0 : 2.0) +
                            o.width * diffgrad::detail::gaussian(seed ^ 0x72696e67u, draw,
                                                                 static_cast<std::uint64_t>(b));
      const double angle = 2.0 * std::numbers::pi * u0;
      x = radius * std::cos(angle);
      y = radius * std::sin(angle);
    } else {
      // Column from u0 (4 columns on [-2, 2]), a dark square in that column from u1.
      const double cx = 4.0 * u0 - 2.0;
      const int col = std::min(3, static_cast<int>(std::floor(cx + 2.0)));
      const double v = 2.0 * u1; // [0, 2]: pick one of the column's two dark squares
      const int which = std::min(1, static_cast<int>(v));
      const int row = 2 * which + ((col % 2 == 0) ? 1 : 0);
      x = cx;
      y = -2.0 + row + (v - which);
    }
    out(b, 0) = static_cast<typename State::Scalar>(o.scale * x);
    out(b, 1) = static_cast<typename State::Scalar>(o.scale * y);
  }
}

} // namespace diffgrad::diffflow
