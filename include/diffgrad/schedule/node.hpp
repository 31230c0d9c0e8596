#pragma once
// A Node is one point of a time grid with everything a step needs precomputed in double:
// the solver never calls the schedule inside the fused pass.
#include <cmath>
#include <limits>

namespace diffgrad {

struct Node {
  double t = 0.0;       ///< schedule time
  double alpha = 1.0;   ///< signal scale alpha_t
  double sigma = 1.0;   ///< noise scale sigma_t
  double lambda = 0.0;  ///< half log-SNR log(alpha/sigma); +inf at sigma = 0
  double model_t = 0.0; ///< the time value the network is called with
};

/// Node with sigma = 0 exactly (the data end of diffusers' final_sigmas_type="zero"):
/// lambda = +inf. Every coefficient function treats this limit explicitly.
inline Node terminal_data_node(double t, double model_t) {
  return Node{t, 1.0, 0.0, std::numeric_limits<double>::infinity(), model_t};
}

} // namespace diffgrad
