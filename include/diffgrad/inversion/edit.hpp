#pragma once
// Round-trip editing (BDIA paper, Algorithm 2): invert a data sample exactly under one
// conditioning, then regenerate from the same latent under another. A model object carries
// its conditioning (a prompt embedding, a class, the mean of GaussianData, ...), so the two
// conditionings are two model objects, which may be the same network type or not.
//
//   LatentPair latent = invert(method, source_model, x0)        // exact: regenerates x0
//   edited = generate(method, target_model, latent)
//
// With measure_round_trip (default on) the latent is also regenerated under the SOURCE
// conditioning and compared with x0: the number that says the inversion was exact.
#include <cmath>
#include <limits>
#include <span>

#include "diffgrad/inversion/engine.hpp"

namespace diffgrad {

struct EditOptions {
  bool measure_round_trip = true;       ///< also regenerate under the source (N more steps)
  bool check_finite = true;             ///< check every model output for NaN/Inf
  AmplificationOptions amplification{}; ///< diagnostic of the inversion
};

template <class State> struct EditResult {
  LatentPair<State> latent; ///< the exact inversion of x0 under the source conditioning
  InversionReport inversion{};
  /// |regenerate(latent, source) - x0| / |x0| (NaN when not measured).
  double round_trip_error = std::numeric_limits<double>::quiet_NaN();
  double edit_change = 0.0; ///< |edited - x0| / |x0|: how much the edit moved the sample
  int model_evals = 0;      ///< all model calls, round-trip check included
};

/// Inverts x0 under `source`, regenerates under `target` into `edited`.
template <ReversibleMethod M, Backend B, class S, class SourceModel, class TargetModel>
EditResult<typename B::state_type>
invert_and_regenerate(const M& method, const B& backend, const S& schedule,
                      std::span<const Node> nodes, SourceModel& source, TargetModel& target,
                      const typename B::state_type& x0, typename B::state_type& edited,
                      const EditOptions& options = {}) {
  using State = typename B::state_type;
  EditResult<State> r;
  InversionOptions inv;
  inv.check_finite = options.check_finite;
  inv.amplification = options.amplification;
  r.inversion = invert(method, backend, schedule, nodes, source, x0, r.latent, inv);
  r.model_evals = r.inversion.model_evals;
  const GenerateOptions gen{options.check_finite};
  const double x0_norm = std::sqrt(backend.squared_norm(x0));
  auto relative_to_x0 = [&](State& scratch, const State& v) {
    backend.lincomb(scratch, term(1.0, v), term(-1.0, x0));
    const double d = std::sqrt(backend.squared_norm(scratch));
    return x0_norm > 0.0 ? d / x0_norm : d;
  };
  State scratch = backend.make_state(B::batch(x0), B::dim(x0));
  if (options.measure_round_trip) {
    State back = backend.make_state(B::batch(x0), B::dim(x0));
    r.model_evals +=
        generate(method, backend, schedule, nodes, source, r.latent, back, gen).model_evals;
    r.round_trip_error = relative_to_x0(scratch, back);
  }
  r.model_evals +=
      generate(method, backend, schedule, nodes, target, r.latent, edited, gen).model_evals;
  r.edit_change = relative_to_x0(scratch, edited);
  return r;
}

} // namespace diffgrad
