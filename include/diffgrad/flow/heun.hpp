#pragma once
// Heun's method (explicit trapezoidal rule) for a velocity field, flow time 0 -> 1:
//   k1 = v(x_i, t_i),  k2 = v(x_i + dt k1, t_{i+1}),  x_{i+1} = x_i + dt (k1 + k2) / 2.
// Order 2, two velocity calls per step. With final_euler = true the last step is a plain
// Euler step, so the velocity is never evaluated at the last time: needed when v is
// singular there (rectified flow to point masses has v ~ 1/(1 - t) at t = 1), the same
// trick EDM's Heun sampler uses at sigma = 0.
#include <span>

#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

class FlowHeun {
public:
  explicit FlowHeun(bool final_euler = false) : final_euler_(final_euler) {}
  bool final_euler() const { return final_euler_; }
  int order() const { return 2; }
  int history() const { return 0; }
  int stages() const { return 2; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_flow_nodes(nodes, "FlowHeun"); }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const Node& s = nodes[static_cast<std::size_t>(i)];
    const Node& t = nodes[static_cast<std::size_t>(i) + 1];
    const double dt = t.t - s.t;
    StepPlan p;
    p.stage_node[0] = s;
    p.output.x = 1.0;
    if (final_euler_ && static_cast<std::size_t>(i) + 2 == nodes.size()) {
      p.output.e[0] = dt;
      return p;
    }
    p.num_stages = 2;
    p.stage_node[1] = t;
    p.stage_input[1].x = 1.0;
    p.stage_input[1].e[0] = dt;
    p.output.e[0] = 0.5 * dt;
    p.output.e[1] = 0.5 * dt;
    return p;
  }

private:
  bool final_euler_;
};

} // namespace diffgrad
