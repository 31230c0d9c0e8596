#pragma once
// Observers see every completed step: progress bars, trajectory capture, cancellation.
#include <concepts>

#include "diffgrad/schedule/node.hpp"

namespace diffgrad {

/// Returned by an observer; `stop` ends sampling after the current step.
enum class ObserverAction { proceed, stop };

/// obs(step, num_steps, node_reached, state) -> ObserverAction (or void).
template <class O, class State>
concept Observer = requires(O& o, int step, int num_steps, const Node& n, const State& x) {
  o(step, num_steps, n, x);
};

struct NullObserver {
  template <class State> void operator()(int, int, const Node&, const State&) const noexcept {}
};

} // namespace diffgrad
