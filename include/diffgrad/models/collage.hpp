#pragma once
// DiffCollage ("DiffCollage: Parallel Generation of Large Content with Diffusion Models"):
// one noise model for a large sample composed from models of its overlapping pieces.
//
// The sample's coordinates are covered by regions: factor nodes (the pieces: crops of a long
// strip, a loop, tiles of a grid) and separator nodes (their overlaps). Each region R has a
// counting number c_R, and the composed prediction is
//
//   eps(u, t) = sum_R c_R E_R eps_R(E_R^T u, t)
//
// (E_R^T: gather R's coordinates; E_R: scatter them back). For a factor graph (separators
// contained in factors only) c = 1 for a factor and c = 1 - d_i for a separator of degree d_i:
// the score of the Bethe approximation p(u) = prod_j q(f_j) / prod_i q(x_i)^(d_i - 1). Regions
// nested deeper (the corners of a 2-D grid of tiles, inside four tiles and four overlaps) get
// the region-graph counting numbers c_R = 1 - sum_{S strictly contains R} c_S, which reduce to
// 1 - d_i for separators. Every coordinate must be counted exactly once: sum_{R contains k} c_R
// = 1 (checked at construction; it is what makes independent coordinates exact).
// Composing eps (not scores) is right only when every piece model uses ONE schedule (same
// sigma_t): the models get the same Node (require_same_schedule checks two schedules).
//
// Exactness: at the data level (sigma -> 0) for tree-structured (acyclic) graphs and for
// independent pieces at every sigma. NOT exact for t > 0 on a Gaussian Markov chain (noising
// breaks the conditional independence), and approximate even at sigma = 0 on loops and grids
// (docs/collage.md gives the numbers).
//
// Cost: regions are grouped; a group's pieces have one width and ONE model, and all pieces of
// all groups served by one model object (for the whole batch) go to that model in one call,
// stacked along the batch (sample-major, backend/index_map.hpp). So a stage costs one model
// call, one gather and one scatter-add per distinct model (and width), and one fill: no
// allocation after the scratch has been sized (at construction for `max_batch`, again only if
// a call brings another batch size).
//
// Parameters and conditioning of the composed model: the concatenation over the DISTINCT
// model objects, in the order they first appear in the group list (a model used by several
// groups is one block, its parameters shared). With several distinct models, dcond / dparams
// must be Eigen vectors (segment views); with one they are passed through unchanged.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/backend/index_map.hpp"
#include "diffgrad/concepts/schedule.hpp"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/model_call.hpp"

namespace diffgrad::models {

/// One group of regions: pieces of one width evaluated by one model. `map`'s piece weights
/// are the counting numbers. A group whose regions all have counting number 0 (leaves) is
/// inactive: it has no map and costs nothing.
struct CollageGroup {
  std::string name;
  std::int64_t width = 0;
  bool active = false;
  IndexMap map;
};

/// A factor graph (or region graph) over the D coordinates of a sample, as groups of index
/// lists with their counting numbers. Built by from_regions or the builders below.
class CollageGraph {
public:
  using Region = std::vector<std::int64_t>;

  /// `groups[g]` lists the regions of group g (each a list of coordinates in [0, dim); all
  /// regions of a group have the group's width, and the group's model evaluates them all).
  /// Groups only assign models: the factors are the regions contained in no other region,
  /// the separators those contained in some, in whichever group they are listed.
  /// Counting numbers: c_R = 1 - sum of c_S over the listed regions S strictly containing R
  /// (1 for a factor, 1 - d for a separator inside d factors). Regions with c_R = 0 are
  /// dropped (they cost nothing). Throws invalid_argument for: an index out of range, a
  /// coordinate repeated within a region, unequal widths within a group, a region listed
  /// twice, and any coordinate not counted exactly once (a coordinate in no region, two
  /// factors intersecting without a separator for their intersection, a separator that is
  /// not an intersection of factors, a separator inside only one factor where another
  /// factor meets it).
  static CollageGraph from_regions(std::int64_t dim, const std::vector<std::vector<Region>>& groups,
                                   std::vector<std::string> names = {}) {
    const char* where = "CollageGraph::from_regions";
    detail::require(dim >= 1, where, "dim", "a sample width D >= 1", static_cast<double>(dim));
    detail::require(!groups.empty(), where, "groups", "at least one group of regions", 0.0);
    if (names.empty())
      for (std::size_t g = 0; g < groups.size(); ++g) names.push_back(detail::concat("group ", g));
    if (names.size() != groups.size())
      detail::throw_argument(
          where, "names", detail::concat("one name per group (", groups.size(), ")"), names.size());

    struct RegionInfo {
      std::size_t group, piece;
      std::vector<std::int64_t> sorted;
      double count = 0.0;
    };
    std::vector<RegionInfo> regions;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      if (groups[g].empty()) continue;
      const auto width = static_cast<std::int64_t>(groups[g][0].size());
      for (std::size_t p = 0; p < groups[g].size(); ++p) {
        const Region& r = groups[g][p];
        if (static_cast<std::int64_t>(r.size()) != width)
          detail::throw_argument(where, "groups",
                                 detail::concat("regions of one width per group (group '", names[g],
                                                "' has width ", width, " from its region 0)"),
                                 detail::concat("region ", p, " of width ", r.size()));
        if (r.empty())
          detail::throw_argument(
              where, "groups", "non-empty regions",
              detail::concat("an empty region ", p, " in group '", names[g], "'"));
        // Range and duplicate checks (as IndexMap's, with the region named), O(width log width).
        for (std::size_t k = 0; k < r.size(); ++k)
          if (r[k] < 0 || r[k] >= dim)
            detail::throw_argument(where, "groups",
                                   detail::concat("column indices in [0, ", dim, ") (region ", p,
                                                  " of group '", names[g], "', position ", k, ")"),
                                   r[k]);
        std::vector<std::int64_t> s = r;
        std::sort(s.begin(), s.end());
        const auto dup = std::adjacent_find(s.begin(), s.end());
        if (dup != s.end())
          detail::throw_argument(where, "groups",
                                 detail::concat("distinct coordinates within a region (region ", p,
                                                " of group '", names[g], "' lists column ", *dup,
                                                " twice)"),
                                 "a duplicate");
        regions.push_back({g, p, std::move(s)});
      }
    }
    // Regions containing each coordinate, to find supersets quickly.
    std::vector<std::vector<std::size_t>> at(static_cast<std::size_t>(dim));
    for (std::size_t i = 0; i < regions.size(); ++i)
      for (std::int64_t k : regions[i].sorted) at[static_cast<std::size_t>(k)].push_back(i);
    auto describe = [&](const RegionInfo& r) {
      return detail::concat("region ", r.piece, " of group '", names[r.group], "'");
    };
    // Larger regions first: a strict superset is strictly larger.
    std::vector<std::size_t> order(regions.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return regions[a].sorted.size() > regions[b].sorted.size();
    });
    for (std::size_t i : order) {
      RegionInfo& r = regions[i];
      double above = 0.0;
      for (std::size_t j : at[static_cast<std::size_t>(r.sorted.front())]) {
        if (j == i) continue;
        const RegionInfo& s = regions[j];
        if (!std::includes(s.sorted.begin(), s.sorted.end(), r.sorted.begin(), r.sorted.end()))
          continue;
        if (s.sorted.size() == r.sorted.size())
          throw invalid_argument(
              detail::concat(where, ": argument 'groups' expected distinct regions, got ",
                             describe(r), " equal to ", describe(s)));
        above += s.count;
      }
      r.count = 1.0 - above;
    }
    // Each coordinate counted exactly once.
    for (std::int64_t k = 0; k < dim; ++k) {
      double total = 0.0;
      for (std::size_t i : at[static_cast<std::size_t>(k)]) total += regions[i].count;
      if (total != 1.0)
        throw invalid_argument(detail::concat(
            where,
            ": argument 'groups' expected every coordinate counted exactly once (sum of the ",
            "counting numbers of the regions containing it = 1), got ", total, " for coordinate ",
            k,
            at[static_cast<std::size_t>(k)].empty()
                ? " (it is in no region)"
                : " (are two factors intersecting without a separator for their intersection, or "
                  "is a separator not an intersection of factors?)"));
    }
    CollageGraph graph;
    graph.dim_ = dim;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      CollageGroup group;
      group.name = names[g];
      group.width = groups[g].empty() ? 0 : static_cast<std::int64_t>(groups[g][0].size());
      std::vector<std::int64_t> idx;
      std::vector<double> w;
      for (const RegionInfo& r : regions)
        if (r.group == g && r.count != 0.0) {
          const Region& orig = groups[g][r.piece];
          idx.insert(idx.end(), orig.begin(), orig.end());
          w.push_back(r.count);
        }
      if (!w.empty()) {
        group.active = true;
        group.map = IndexMap(dim, group.width, std::move(idx), std::move(w), where);
      }
      graph.groups_.push_back(std::move(group));
    }
    return graph;
  }

  std::int64_t dim() const { return dim_; }
  std::span<const CollageGroup> groups() const { return groups_; }
  const CollageGroup& group(std::size_t g) const { return groups_.at(g); }
  std::size_t num_groups() const { return groups_.size(); }

private:
  std::int64_t dim_ = 0;
  std::vector<CollageGroup> groups_;
};

/// A long image made of `pieces` crops side by side: each crop `height` x `piece_width`
/// (x `channels`), neighbours overlapping by `overlap` columns. The sample is channels x
/// height x width, flattened channel-major then row-major (column ch H W + r W + c), with
/// width = pieces * piece_width - (pieces - 1) * overlap; a piece is flattened the same way.
struct StripShape {
  std::int64_t pieces = 2;
  std::int64_t piece_width = 2;
  std::int64_t overlap = 1;
  std::int64_t height = 1;
  std::int64_t channels = 1;
};

namespace collage_detail {
inline void check_strip(const StripShape& s, const char* where) {
  detail::require(s.pieces >= 1, where, "shape.pieces", "at least 1 piece",
                  static_cast<double>(s.pieces));
  detail::require(s.piece_width >= 1, where, "shape.piece_width", "a piece width >= 1",
                  static_cast<double>(s.piece_width));
  detail::require(s.height >= 1, where, "shape.height", "a height >= 1",
                  static_cast<double>(s.height));
  detail::require(s.channels >= 1, where, "shape.channels", "at least 1 channel",
                  static_cast<double>(s.channels));
  detail::require(s.overlap >= 0 && 2 * s.overlap <= s.piece_width, where, "shape.overlap",
                  detail::concat("an overlap in [0, piece_width / 2] = [0, ", s.piece_width / 2,
                                 "] (pieces two apart must not overlap)"),
                  static_cast<double>(s.overlap));
}
/// The coordinates of rows [r0, r0 + h) x columns (c0 + j) mod width, j < w, all channels.
inline CollageGraph::Region block(std::int64_t height, std::int64_t width, std::int64_t channels,
                                  std::int64_t r0, std::int64_t h, std::int64_t c0,
                                  std::int64_t w) {
  CollageGraph::Region out;
  out.reserve(static_cast<std::size_t>(channels * h * w));
  for (std::int64_t ch = 0; ch < channels; ++ch)
    for (std::int64_t r = r0; r < r0 + h; ++r)
      for (std::int64_t j = 0; j < w; ++j)
        out.push_back(ch * height * width + r * width + (c0 + j) % width);
  return out;
}
} // namespace collage_detail

/// Width of the strip (columns) that strip_graph(shape) covers.
inline std::int64_t strip_width(const StripShape& s) {
  return s.pieces * s.piece_width - (s.pieces - 1) * s.overlap;
}

/// A linear strip (chain): groups "pieces" (height x piece_width x channels) and "overlaps"
/// (height x overlap x channels, counting number -1 each; inactive when overlap = 0).
inline CollageGraph strip_graph(const StripShape& s) {
  collage_detail::check_strip(s, "strip_graph");
  const std::int64_t width = strip_width(s), step = s.piece_width - s.overlap;
  std::vector<std::vector<CollageGraph::Region>> groups(2);
  for (std::int64_t p = 0; p < s.pieces; ++p)
    groups[0].push_back(
        collage_detail::block(s.height, width, s.channels, 0, s.height, p * step, s.piece_width));
  if (s.overlap > 0)
    for (std::int64_t p = 1; p < s.pieces; ++p)
      groups[1].push_back(
          collage_detail::block(s.height, width, s.channels, 0, s.height, p * step, s.overlap));
  return CollageGraph::from_regions(s.channels * s.height * width, groups, {"pieces", "overlaps"});
}

/// A 1-D chain of `pieces` windows of `piece_width` coordinates overlapping by `overlap`.
inline CollageGraph chain_graph(std::int64_t pieces, std::int64_t piece_width,
                                std::int64_t overlap) {
  return strip_graph({pieces, piece_width, overlap, 1, 1});
}

/// Width of the loop (columns) that loop_graph(shape) covers: pieces * (piece_width - overlap).
inline std::int64_t loop_width(const StripShape& s) {
  return s.pieces * (s.piece_width - s.overlap);
}

/// A 360-degree loop: as strip_graph, but the last piece wraps around to the first columns
/// (columns mod loop_width). Seam rule: every seam, the wrap-around one included, subtracts
/// its overlap model's eps (the Bethe weights of the cycle graph); the official code's
/// averaging at the wrap seam is not used (docs/collage.md). Needs pieces >= 2 and
/// overlap >= 1.
inline CollageGraph loop_graph(const StripShape& s) {
  collage_detail::check_strip(s, "loop_graph");
  detail::require(s.pieces >= 2, "loop_graph", "shape.pieces", "at least 2 pieces for a loop",
                  static_cast<double>(s.pieces));
  detail::require(s.overlap >= 1, "loop_graph", "shape.overlap",
                  "an overlap >= 1 (a loop without overlap is independent pieces: use strip_graph)",
                  static_cast<double>(s.overlap));
  const std::int64_t width = loop_width(s), step = s.piece_width - s.overlap;
  std::vector<std::vector<CollageGraph::Region>> groups(2);
  for (std::int64_t p = 0; p < s.pieces; ++p) {
    groups[0].push_back(
        collage_detail::block(s.height, width, s.channels, 0, s.height, p * step, s.piece_width));
    groups[1].push_back(
        collage_detail::block(s.height, width, s.channels, 0, s.height, (p + 1) * step, s.overlap));
  }
  return CollageGraph::from_regions(s.channels * s.height * width, groups, {"pieces", "overlaps"});
}

/// A rows x cols grid of tiles (tile_height x tile_width x channels), neighbours overlapping
/// by overlap_rows / overlap_cols. Groups: "tiles", "row overlaps" (between horizontal
/// neighbours: tile_height x overlap_cols), "column overlaps" (between vertical neighbours:
/// overlap_rows x tile_width), "corners" (overlap_rows x overlap_cols where four tiles meet;
/// counting number +1). Empty groups are inactive. Layout as StripShape's.
struct GridShape {
  std::int64_t rows = 2, cols = 2;
  std::int64_t tile_height = 2, tile_width = 2;
  std::int64_t overlap_rows = 1, overlap_cols = 1;
  std::int64_t channels = 1;
};
inline std::int64_t grid_height(const GridShape& g) {
  return g.rows * g.tile_height - (g.rows - 1) * g.overlap_rows;
}
inline std::int64_t grid_width(const GridShape& g) {
  return g.cols * g.tile_width - (g.cols - 1) * g.overlap_cols;
}
inline CollageGraph grid_graph(const GridShape& g) {
  const char* where = "grid_graph";
  collage_detail::check_strip({g.rows, g.tile_height, g.overlap_rows, 1, g.channels}, where);
  collage_detail::check_strip({g.cols, g.tile_width, g.overlap_cols, 1, g.channels}, where);
  const std::int64_t h = grid_height(g), w = grid_width(g), sr = g.tile_height - g.overlap_rows,
                     sc = g.tile_width - g.overlap_cols;
  using collage_detail::block;
  std::vector<std::vector<CollageGraph::Region>> groups(4);
  for (std::int64_t i = 0; i < g.rows; ++i)
    for (std::int64_t j = 0; j < g.cols; ++j) {
      groups[0].push_back(block(h, w, g.channels, i * sr, g.tile_height, j * sc, g.tile_width));
      if (g.overlap_cols > 0 && j + 1 < g.cols)
        groups[1].push_back(
            block(h, w, g.channels, i * sr, g.tile_height, (j + 1) * sc, g.overlap_cols));
      if (g.overlap_rows > 0 && i + 1 < g.rows)
        groups[2].push_back(
            block(h, w, g.channels, (i + 1) * sr, g.overlap_rows, j * sc, g.tile_width));
      if (g.overlap_rows > 0 && g.overlap_cols > 0 && i + 1 < g.rows && j + 1 < g.cols)
        groups[3].push_back(
            block(h, w, g.channels, (i + 1) * sr, g.overlap_rows, (j + 1) * sc, g.overlap_cols));
    }
  return CollageGraph::from_regions(g.channels * h * w, groups,
                                    {"tiles", "row overlaps", "column overlaps", "corners"});
}

/// Throws invalid_argument unless `other` is the same schedule as `reference` (alpha, sigma
/// and the model time agree to `rtol` at 65 times across [t_min, t_max], and the ranges
/// agree): eps-space composition is only right with one shared sigma_t. `arg` names the
/// piece model's schedule in the message.
template <Schedule S0, Schedule S1>
void require_same_schedule(const S0& reference, const S1& other, const char* arg,
                           double rtol = 1e-12) {
  const char* where = "collage";
  auto close = [rtol](double a, double b) {
    return std::abs(a - b) <= rtol * std::max({1.0, std::abs(a), std::abs(b)});
  };
  if (!close(reference.t_min(), other.t_min()) || !close(reference.t_max(), other.t_max()))
    detail::throw_argument(where, arg,
                           detail::concat("the reference schedule's time range [",
                                          reference.t_min(), ", ", reference.t_max(),
                                          "] (all pieces share one schedule)"),
                           detail::concat("[", other.t_min(), ", ", other.t_max(), "]"));
  constexpr int kSamples = 65;
  for (int i = 0; i < kSamples; ++i) {
    const double t =
        reference.t_min() + (reference.t_max() - reference.t_min()) * i / (kSamples - 1);
    const double a0 = reference.alpha(t), a1 = other.alpha(t), s0 = reference.sigma(t),
                 s1 = other.sigma(t), m0 = reference.model_time(t), m1 = other.model_time(t);
    if (!close(a0, a1) || !close(s0, s1) || !close(m0, m1))
      detail::throw_argument(
          where, arg,
          detail::concat("the reference schedule (all pieces share one schedule: eps-space ",
                         "composition needs one sigma_t); at t = ", t, " alpha = ", a0,
                         ", sigma = ", s0, ", model time = ", m0),
          detail::concat("alpha = ", a1, ", sigma = ", s1, ", model time = ", m1));
  }
}

/// The composed noise model (node-aware: every group's model gets the same Node). `B` is
/// the backend (gather, scatter_add, fill, make_state), `Model` the piece models' type (one
/// object per group, possibly the same object for several groups). The backend and models
/// must outlive the Collage. Not thread-safe (scratch buffers).
template <class B, class Model> class Collage {
public:
  using state_type = typename B::state_type;
  using vector_type = typename B::vector_type;
  using map_type =
      decltype(std::declval<const B&>().make_index_map(std::declval<const IndexMap&>()));

  /// `models[g]` evaluates group g (null for an inactive group is allowed). Scratch is sized
  /// for `max_batch` samples. A model with dim() must have the group's width.
  Collage(const B& backend, CollageGraph graph, std::vector<Model*> models,
          std::int64_t max_batch = 1)
      : backend_(&backend), graph_(std::move(graph)), models_(std::move(models)) {
    const char* where = "Collage";
    if (models_.size() != graph_.num_groups())
      detail::throw_argument(
          where, "models",
          detail::concat("one model per group of the graph (", graph_.num_groups(), ")"),
          models_.size());
    detail::require(max_batch >= 1, where, "max_batch", "a batch size >= 1",
                    static_cast<double>(max_batch));
    for (std::size_t g = 0; g < models_.size(); ++g) {
      const CollageGroup& group = graph_.group(g);
      if (!group.active) continue;
      if (models_[g] == nullptr)
        throw invalid_argument(detail::concat(where,
                                              ": argument 'models' expected a model for group ", g,
                                              " ('", group.name, "'), got null"));
      if constexpr (requires(const Model& m) { m.dim(); }) {
        if (static_cast<std::int64_t>(models_[g]->dim()) != group.width)
          throw invalid_argument(
              detail::concat(where, ": argument 'models' expected a model of dimension ",
                             group.width, " (the width of group ", g, " '", group.name,
                             "') for group ", g, ", got dimension ", models_[g]->dim()));
      }
      // Groups served by the same model object (of one width) share ONE call: their pieces
      // are concatenated into one map (each keeps its counting number).
      auto same = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) {
        return models_[s.group] == models_[g] && s.host.width() == group.width;
      });
      if (same == slots_.end()) {
        Slot slot;
        slot.group = g;
        slot.name = group.name;
        slot.host = group.map;
        slots_.push_back(std::move(slot));
      } else {
        std::vector<std::int64_t> idx(same->host.indices().begin(), same->host.indices().end());
        std::vector<double> w(same->host.weights().begin(), same->host.weights().end());
        idx.insert(idx.end(), group.map.indices().begin(), group.map.indices().end());
        w.insert(w.end(), group.map.weights().begin(), group.map.weights().end());
        same->host = IndexMap(graph_.dim(), group.width, std::move(idx), std::move(w), where);
        same->name += " + " + group.name;
      }
      if (std::find(distinct_.begin(), distinct_.end(), models_[g]) == distinct_.end())
        distinct_.push_back(models_[g]);
    }
    for (Slot& s : slots_) s.map = backend.make_index_map(s.host);
    reserve(max_batch);
  }

  const CollageGraph& graph() const { return graph_; }
  std::int64_t dim() const { return graph_.dim(); }
  /// Model calls per eps / vjp: one per distinct (model object, width) among active groups.
  std::size_t calls_per_eval() const { return slots_.size(); }

  std::int64_t cond_size() const {
    std::int64_t n = 0;
    for (Model* m : distinct_) n += static_cast<std::int64_t>(m->cond_size());
    return n;
  }
  std::int64_t param_size() const {
    std::int64_t n = 0;
    for (Model* m : distinct_) n += static_cast<std::int64_t>(m->param_size());
    return n;
  }

  /// out = sum over groups and pieces of c_R E_R eps_model(E_R^T x, node).
  void eps(const state_type& x, const Node& n, state_type& out) {
    const std::int64_t rows = check_input(x, "Collage::eps", "x");
    if (&out == &x) // out is zeroed before x is read
      detail::throw_argument("Collage::eps", "out", "a state other than 'x'", "the same object");
    if (B::batch(out) != rows || B::dim(out) != dim()) out = backend_->make_state(rows, dim());
    backend_->fill(out, 0.0);
    for (Slot& s : slots_) {
      backend_->gather(x, s.map, s.in);
      EpsField<Model>{*models_[s.group]}(static_cast<const state_type&>(s.in), n, s.out);
      check_piece_output(s, s.out, "eps");
      backend_->scatter_add(s.out, s.map, 1.0, out, PieceWeights::apply);
    }
  }

  /// dx = sum_R c_R E_R J_R^T E_R^T a; dcond / dparams accumulate each model's VJP at its
  /// pieces' cotangents c_R E_R^T a (concatenated over distinct models, see the header).
  void vjp(const state_type& x, const Node& n, const state_type& a, state_type& dx,
           vector_type* dcond, vector_type* dparams) {
    const char* where = "Collage::vjp";
    const std::int64_t rows = check_input(x, where, "x");
    if (B::batch(a) != rows || B::dim(a) != dim())
      detail::throw_argument(where, "cotangent",
                             detail::concat("shape ", rows, " x ", dim(), " (x's shape)"),
                             detail::concat(B::batch(a), " x ", B::dim(a)));
    if (&dx == &x || &dx == &a) // dx is zeroed before x and a are read
      detail::throw_argument(where, "dx", "a state other than 'x' and 'cotangent'",
                             "the same object");
    if (B::batch(dx) != rows || B::dim(dx) != dim()) dx = backend_->make_state(rows, dim());
    if (dcond) check_vector_size(*dcond, cond_size(), where, "dcond");
    if (dparams) check_vector_size(*dparams, param_size(), where, "dparams");
    const bool split = distinct_.size() > 1;
    backend_->fill(dx, 0.0);
    for (Slot& s : slots_) {
      Model* model = models_[s.group];
      backend_->gather(x, s.map, s.in);
      backend_->gather(a, s.map, s.cot, 1.0, PieceWeights::apply);
      if (!split) {
        EpsVjp<Model>{*model}(static_cast<const state_type&>(s.in), n,
                              static_cast<const state_type&>(s.cot), s.out, dcond, dparams);
      } else {
        if constexpr (requires(vector_type & v) {
                        vector_type::Zero(1);
                        v.segment(0, 1);
                        v.setZero();
                      }) {
          const std::size_t k = distinct_index(model);
          vector_type* dc = nullptr;
          vector_type* dp = nullptr;
          if (dcond) {
            cond_scratch_[k].setZero();
            dc = &cond_scratch_[k];
          }
          if (dparams) {
            param_scratch_[k].setZero();
            dp = &param_scratch_[k];
          }
          EpsVjp<Model>{*model}(static_cast<const state_type&>(s.in), n,
                                static_cast<const state_type&>(s.cot), s.out, dc, dp);
          if (dcond) dcond->segment(cond_offset_[k], cond_scratch_[k].size()) += cond_scratch_[k];
          if (dparams)
            dparams->segment(param_offset_[k], param_scratch_[k].size()) += param_scratch_[k];
        } else {
          throw invalid_argument("Collage::vjp: several distinct piece models need host (Eigen) "
                                 "vectors for dcond / dparams");
        }
      }
      check_piece_output(s, s.out, "vjp dx");
      backend_->scatter_add(s.out, s.map, 1.0, dx, PieceWeights::ignore);
    }
  }

  /// Sizes the scratch for `batch` samples (allocates); calls with that batch size then
  /// allocate nothing.
  void reserve(std::int64_t batch) {
    for (Slot& s : slots_) {
      const IndexMap& m = s.host;
      for (state_type* st : {&s.in, &s.out, &s.cot})
        *st = backend_->make_state(batch * m.pieces(), m.width());
    }
    batch_ = batch;
    if constexpr (requires(vector_type & v, const Model& m) {
                    vector_type::Zero(1);
                    v.setZero();
                    m.cond_size();
                    m.param_size();
                  }) {
      if (distinct_.size() > 1 && cond_scratch_.empty()) {
        std::int64_t co = 0, po = 0;
        for (Model* m : distinct_) {
          const auto cs = static_cast<std::int64_t>(m->cond_size());
          const auto ps = static_cast<std::int64_t>(m->param_size());
          cond_scratch_.push_back(vector_type::Zero(cs));
          param_scratch_.push_back(vector_type::Zero(ps));
          cond_offset_.push_back(co);
          param_offset_.push_back(po);
          co += cs;
          po += ps;
        }
      }
    }
  }

private:
  struct Slot {
    std::size_t group = 0; ///< the first group this call serves (its model)
    std::string name;      ///< the groups' names, for messages
    IndexMap host;         ///< the pieces of every group this call serves
    map_type map;
    state_type in, out, cot;
  };

  std::int64_t check_input(const state_type& x, const char* where, const char* arg) {
    if (B::dim(x) != dim())
      detail::throw_argument(where, arg,
                             detail::concat("rows of width D = ", dim(), " (the graph's dim)"),
                             detail::concat(B::dim(x), " columns"));
    const auto rows = static_cast<std::int64_t>(B::batch(x));
    if (rows != batch_) reserve(rows);
    return rows;
  }
  void check_piece_output(const Slot& s, const state_type& out, const char* what) const {
    const IndexMap& m = s.host;
    if (static_cast<std::int64_t>(B::batch(out)) != batch_ * m.pieces() ||
        static_cast<std::int64_t>(B::dim(out)) != m.width())
      throw invalid_argument(detail::concat(
          "Collage: the model of group ", s.group, " ('", s.name, "') returned ", what,
          " of shape ", B::batch(out), " x ", B::dim(out), ", expected ", batch_ * m.pieces(),
          " x ", m.width(), " (batch x pieces stacked, piece width)"));
  }
  template <class V>
  static void check_vector_size(const V& v, std::int64_t size, const char* where, const char* arg) {
    if (static_cast<std::int64_t>(v.size()) != size)
      detail::throw_argument(where, arg, detail::concat("length ", size), v.size());
  }
  std::size_t distinct_index(const Model* m) const {
    return static_cast<std::size_t>(std::find(distinct_.begin(), distinct_.end(), m) -
                                    distinct_.begin());
  }

  const B* backend_;
  CollageGraph graph_;
  std::vector<Model*> models_;
  std::vector<Model*> distinct_;
  std::vector<Slot> slots_;
  std::int64_t batch_ = 0;
  std::vector<vector_type> cond_scratch_, param_scratch_;
  std::vector<std::int64_t> cond_offset_, param_offset_;
};

// ---- Exact reference pieces from a data set ------------------------------------------------

/// The crop of every row of `points` (K x D) to the coordinates `coords`, in that order
/// (K x n). The marginal of a Dirac or isotropic Gaussian mixture on a subset of coordinates
/// is the mixture of the cropped points/means with the same weights and stds, so
/// DiracMixture(crop_points(Y, c), w) is the exact model of the crop c.
template <class Matrix>
Eigen::Matrix<typename Matrix::Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>
crop_points(const Matrix& points, std::span<const std::int64_t> coords) {
  for (std::size_t k = 0; k < coords.size(); ++k)
    if (coords[k] < 0 || coords[k] >= points.cols())
      detail::throw_argument(
          "crop_points", "coords",
          detail::concat("column indices in [0, ", points.cols(), ") (position ", k, ")"),
          coords[k]);
  Eigen::Matrix<typename Matrix::Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> out(
      points.rows(), static_cast<Eigen::Index>(coords.size()));
  for (Eigen::Index r = 0; r < points.rows(); ++r)
    for (std::size_t k = 0; k < coords.size(); ++k)
      out(r, static_cast<Eigen::Index>(k)) = points(r, coords[k]);
  return out;
}

/// All windows of `width` consecutive columns of every row of `strips` (N x L): the data of a
/// stationary piece model (one model shared by every position of a strip). Without `wrap`
/// there are N (L - width + 1) windows, with `wrap` (loops: columns mod L) N L.
template <class Matrix>
Eigen::Matrix<typename Matrix::Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>
window_crops(const Matrix& strips, std::int64_t width, bool wrap = false) {
  const auto n = static_cast<std::int64_t>(strips.rows()),
             len = static_cast<std::int64_t>(strips.cols());
  detail::require(width >= 1 && width <= len, "window_crops", "width",
                  detail::concat("a window width in [1, ", len, "] (the strips' length)"),
                  static_cast<double>(width));
  const std::int64_t per = wrap ? len : len - width + 1;
  Eigen::Matrix<typename Matrix::Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> out(
      n * per, width);
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t o = 0; o < per; ++o)
      for (std::int64_t k = 0; k < width; ++k) out(r * per + o, k) = strips(r, (o + k) % len);
  return out;
}

} // namespace diffgrad::models
