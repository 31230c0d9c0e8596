#pragma once
// The CPU side of the index-map (Collage gather / scatter_add) tests: EigenBackend's gather and
// scatter_add on host vectors, compiled by the host compiler (cpu_reference_collage.cpp), so
// Eigen stays out of the .cu files (see cpu_reference.hpp).
#include <vector>

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

} // namespace diffgrad::testing
