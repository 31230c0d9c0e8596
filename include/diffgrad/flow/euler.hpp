#pragma once
// Euler's method for a velocity field dx/dt = v(x, t), flow time 0 (noise) -> 1 (data):
//   x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i).                         (order 1)
// The plain sampler of rectified flow / flow matching, and the base step of FlowGrad.
#include <span>

#include "diffgrad/flow/sample_flow.hpp"
#include "diffgrad/solvers/step_plan.hpp"

namespace diffgrad {

class FlowEuler {
public:
  int order() const { return 1; }
  int history() const { return 0; }
  int stages() const { return 1; }
  bool stochastic() const { return false; }
  void validate(std::span<const Node> nodes) const { validate_flow_nodes(nodes, "FlowEuler"); }
  StepPlan plan(std::span<const Node> nodes, int i, NodeAtLambda) const {
    const Node& s = nodes[static_cast<std::size_t>(i)];
    const Node& t = nodes[static_cast<std::size_t>(i) + 1];
    StepPlan p;
    p.stage_node[0] = s;
    p.output.x = 1.0;
    p.output.e[0] = t.t - s.t;
    return p;
  }
};

} // namespace diffgrad
