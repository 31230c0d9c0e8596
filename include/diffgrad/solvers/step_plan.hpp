#pragma once
// The common shape of every sampler in diffgrad. A step i -> i+1 is a short program of
// stages; stage s evaluates the model at a state u_s that is a linear combination of the
// vectors the step can see, and the new state is one more linear combination:
//
//   u_0 = x_i,                         e_s = model(u_s, stage_node[s])
//   u_s = Combo_s(x_i, u_<s, e_<s, history)            (s >= 1, singlestep / RK stages)
//   x_{i+1} = Combo_out(x_i, u, e, history) + noise * xi_i
//
// where the history holds the states x_{i-1-j} and model outputs e_{i-1-j} of earlier steps
// (multistep methods). Data predictions x0 = (u - sigma e)/alpha and rho-space updates are
// expanded into these coefficients by the scheme, so the engine only ever does a fused
// lincomb. The same plan drives the forward pass and the exact discrete adjoint. The
// coefficients are scalars for isotropic diffusions and structured (2x2 blocks, per-column
// diagonals: backend/coefficient.hpp) for gDDIM; the engine is templated over the kind.
#include <cmath>

#include "diffgrad/backend/coefficient.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// Which quantity a scheme extrapolates: the noise eps (DPM-Solver, DEIS) or the data
/// prediction x0 = (x - sigma eps)/alpha (DPM-Solver++). Independent of what the network
/// outputs (that is the prediction-type adapter's business, models/prediction.hpp).
enum class SolverPrediction { noise, data };

inline constexpr int kMaxStages = 4;   ///< RK4 has four stages
inline constexpr int kMaxHistory = 3;  ///< 4th-order iPNDM looks three steps back

/// Coefficients of one linear combination over everything a step can see. Coeff is a
/// coefficient kind of backend/coefficient.hpp: double for every isotropic scheme, Block2 or
/// ColumnCoeff for diffusions with matrix-valued coefficients (gDDIM).
template <class Coeff> struct BasicCombo {
  using coeff_type = Coeff;
  Coeff x{};                      ///< x_i (= u_0)
  Coeff u[kMaxStages]{};          ///< stage inputs u_s, s >= 1 (u[0] is unused: use x)
  Coeff e[kMaxStages]{};          ///< stage model outputs e_s
  Coeff hist_x[kMaxHistory]{};    ///< x_{i-1-j}
  Coeff hist_e[kMaxHistory]{};    ///< e_{i-1-j} (model output at x_{i-1-j})
};

template <class Coeff> struct BasicStepPlan {
  using coeff_type = Coeff;
  int num_stages = 1;
  Node stage_node[kMaxStages]{};          ///< stage_node[0] is the step's start node
  BasicCombo<Coeff> stage_input[kMaxStages]{}; ///< stage_input[s] for s >= 1
  BasicCombo<Coeff> output{};
  Coeff noise{}; ///< coefficient of the step's Gaussian noise xi_i (zero: deterministic)
};

using Combo = BasicCombo<double>;
using StepPlan = BasicStepPlan<double>;

/// Type-erased, non-owning "lambda -> Node" map, so schemes can place intermediate stages
/// (singlestep DPM-Solver) without knowing the schedule type. No allocation.
class NodeAtLambda {
public:
  template <class S>
  explicit NodeAtLambda(const S& schedule)
      : obj_(&schedule), fn_([](const void* o, double lambda) {
          const S& s = *static_cast<const S*>(o);
          return s.node(s.t_of_lambda(lambda));
        }) {}
  Node operator()(double lambda) const { return fn_(obj_, lambda); }

private:
  const void* obj_;
  Node (*fn_)(const void*, double);
};

/// (x - sigma e)/alpha expressed as combo coefficients: adds w * x0(u_s, e_s) to `c`.
/// Stage 0 reads x_i; history index j >= 0 reads x_{i-1-j}.
inline void add_data_prediction_stage(Combo& c, int stage, const Node& n, double w) {
  if (stage == 0)
    c.x += w / n.alpha;
  else
    c.u[stage] += w / n.alpha;
  c.e[stage] += -w * n.sigma / n.alpha;
}
inline void add_data_prediction_history(Combo& c, int j, const Node& n, double w) {
  c.hist_x[j] += w / n.alpha;
  c.hist_e[j] += -w * n.sigma / n.alpha;
}

} // namespace diffgrad
