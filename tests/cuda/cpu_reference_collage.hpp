#pragma once
// The CPU side of the index-map (Collage gather / scatter_add) and Collage tests: EigenBackend's
// gather and scatter_add on host vectors, compiled by the host compiler
// (cpu_reference_collage.cpp), so Eigen stays out of the .cu files (see cpu_reference.hpp).
#include <vector>

#include "cases.hpp"
#include "cuda_test_support.hpp"
#include "diffgrad/backend/index_map.hpp"

namespace diffgrad::testing {

/// EigenBackend::gather of a batch x map.dim() state `big` (values rounded to the precision
/// first): the (batch * P) x n pieces, row-major, as doubles.
std::vector<double> cpu_gather(Precision p, const IndexMap& map, const std::vector<double>& big,
                               int batch, double scale, PieceWeights weights);
/// EigenBackend::scatter_add of (batch * P) x n `pieces` into the batch x map.dim() state
/// `big` (both rounded to the precision first): the updated big state, as doubles.
std::vector<double> cpu_scatter_add(Precision p, const IndexMap& map,
                                    const std::vector<double>& pieces,
                                    const std::vector<double>& big, int batch, double scale,
                                    PieceWeights weights);

/// The Collage case of collage_cases.hpp: a chain of `pieces` windows of `piece_width`
/// overlapping by `overlap`, Dirac mixtures of `points` points, `batch` samples.
struct CollageProblem {
  int pieces = 4, piece_width = 6, overlap = 2, points = 5, batch = 3;
  int dim() const { return pieces * piece_width - (pieces - 1) * overlap; }
};

/// The CPU half of collage_cases.hpp's case: EigenBackend<double> and models::DiracMixture.
Parts cpu_collage_case(const CollageProblem& cp = {});

} // namespace diffgrad::testing
