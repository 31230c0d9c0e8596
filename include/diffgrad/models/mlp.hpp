#pragma once
// A small multilayer perceptron on Eigen, usable as an eps network (eps/vjp) or as a flow's
// velocity network (velocity/velocity_vjp): the same function, read either way.
//
// Network (B samples at once, every layer one GEMM):
//   input  h_0 = [ x (d) | sin(omega_j tau), j < F | cos(omega_j tau), j < F | z (c) ]
//          tau = time_scale * t;  z is the shared conditioning vector
//          omega_j = pi 2^j (TimeEmbedding::dyadic, the default), or F frequencies equally
//          spaced in [frequency_min, frequency_max] (TimeEmbedding::linear: the Path
//          Integral Sampler's embedding, 0.1 .. 100; its learnable phase is not modelled)
//   hidden h_{l+1} = act(h_l W_l^T + b_l)          act = tanh or SiLU (a sigmoid(a))
//   output y = h_L W_L^T + b_L                      (size output_dim, default d; linear)
// The output size may differ from the input's (output_dim), and the input may be time alone
// (dim = 0, output_dim >= 1: a network of t only, e.g. PIS-Grad's NN2(t)); such a network
// is read through eps/velocity/drift all the same, with outputs of B x output_dim. VJPs take
// a cotangent of the output's shape and return dx of the input's (B x d).
// Parameters live in ONE flat vector, layer after layer: W_0 (row-major, n_1 x n_0, i.e.
// torch.nn.Linear's weight), b_0, W_1, b_1, ..., W_L, b_L, the order of a torch
// nn.Sequential's state_dict. Exact VJPs (manual backprop) w.r.t. x, z and the parameters.
// The deterministic initialiser draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's Linear
// default) from Philox keyed by the seed, counter = parameter index.
// Save/load: a text format (see save()) that round-trips doubles exactly.
// Threads (docs/threading.md): eps and the VJPs run in fixed blocks of row_block() rows
// (single-threaded GEMMs per block) and the parameter VJP's batch sums in fixed blocks of
// impl::kComponentBlock output neurons per layer, so the bits do not depend on the thread
// count (set_num_threads, default DIFFGRAD_NUM_THREADS).
// Speed: a forward-only call (eps/velocity/drift) takes each block through all layers in a
// per-thread scratch of 2 x row_block() x (widest layer) scalars, so the activations stay in
// the core's cache and nothing of the batch's size is written but the output; each layer is
// b broadcast into the block, then one accumulating GEMM (no zero fill), then the activation in
// place. The input columns that every row shares (time features, z) enter the first layer once
// per call, folded into its bias, so its GEMM runs over the d state columns only. The VJPs
// re-run the same forward into whole-batch buffers (they need every layer's pre-activation)
// with the same operations in the same order, so both see the same bits. SiLU is
// models/silu.hpp: in float64 with AVX-512F an exp without a division, then the one quotient
// (the plain expression's two divisions were a third of the forward pass), within 2 ulps.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <istream>
#include <limits>
#include <numbers>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "diffgrad/core/error.hpp"
#include "diffgrad/detail/thread_pool.hpp"
#include "diffgrad/models/dirac_mixture.hpp" // shape checks shared by the reference models
#include "diffgrad/models/mlp_init.hpp"
#include "diffgrad/models/silu.hpp"
#include "diffgrad/schedule/node.hpp"

namespace diffgrad::models {

enum class Activation { tanh, silu };

/// How t becomes the sin/cos input features (header comment).
enum class TimeEmbedding { dyadic, linear };

inline const char* activation_name(Activation a) { return a == Activation::tanh ? "tanh" : "silu"; }

struct MlpConfig {
  int dim = 2;                     ///< d: state dimension (input x; 0: a network of t alone)
  int cond_dim = 0;                ///< c: length of the conditioning vector z
  int time_frequencies = 4;        ///< F: sin/cos features at omega_j = pi 2^j, j < F
  double time_scale = 1.0;         ///< tau = time_scale * t (use 1e-3 for t in [0, 1000])
  std::vector<int> hidden{64, 64}; ///< widths of the hidden layers (may be empty: linear)
  Activation activation = Activation::silu;
  int output_dim = 0; ///< output size; 0 means d (an eps / velocity / drift network)
  TimeEmbedding time_embedding = TimeEmbedding::dyadic;
  double frequency_min = 0.1;   ///< TimeEmbedding::linear: the lowest omega
  double frequency_max = 100.0; ///< TimeEmbedding::linear: the highest omega
};

template <class Scalar> class Mlp {
public:
  using state_type = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_type = state_type;
  using vector_type = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

  /// Default rows per block of eps and the VJPs (set_row_block). Blocks are fixed, so the bits
  /// do not depend on the thread count. 128 rows amortise the packing of each weight matrix
  /// over 2x more rows than the mixtures' 64; 256 was 2-3% faster at B = 16384 but left a
  /// second thread idle up to B = 256 (PIS trains on B = 300): benchmarks/RESULTS.md section 3.
  static constexpr Eigen::Index kRowBlock = 128;

  /// Initialised deterministically from `seed`.
  explicit Mlp(MlpConfig config, std::uint64_t seed = 0) : config_(std::move(config)) {
    build_layout();
    initialize(seed);
  }

  /// Given parameters (length param_size(), layout above).
  Mlp(MlpConfig config, const vector_type& params) : config_(std::move(config)) {
    build_layout();
    set_params(params);
  }

  const MlpConfig& config() const { return config_; }
  std::int64_t dim() const { return config_.dim; }
  /// The output size (config.output_dim, or d when that is 0).
  std::int64_t output_dim() const { return out_dim(config_); }
  std::int64_t cond_size() const { return config_.cond_dim; }
  std::int64_t param_size() const { return param_size_; }
  std::int64_t input_size() const { return widths_.front(); }
  /// Layer widths n_0 (input), n_1, ..., n_{L+1} = d.
  const std::vector<Eigen::Index>& widths() const { return widths_; }
  /// Offset of W_l and of b_l in the flat parameter vector.
  Eigen::Index weight_offset(std::size_t layer) const { return offsets_[layer]; }
  Eigen::Index bias_offset(std::size_t layer) const {
    return offsets_[layer] + widths_[layer + 1] * widths_[layer];
  }

  const vector_type& cond() const { return cond_; }
  vector_type& cond() { return cond_; }
  void set_cond(const vector_type& z) {
    impl::require_size(z, config_.cond_dim, "Mlp::set_cond", "z");
    cond_ = z;
  }
  const vector_type& params() const { return params_; }
  vector_type& params() { return params_; }
  void set_params(const vector_type& p) {
    impl::require_size(p, param_size_, "Mlp::set_params", "params");
    params_ = p;
  }

  /// Redraws every weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) keyed by `seed`.
  void initialize(std::uint64_t seed) {
    params_.resize(param_size_);
    for (std::size_t l = 0; l + 1 < widths_.size(); ++l) {
      const Eigen::Index end = bias_offset(l) + widths_[l + 1];
      for (Eigen::Index i = offsets_[l]; i < end; ++i)
        params_(i) = Scalar(mlp_init::parameter(i, widths_[l], seed));
    }
  }

  /// The frequency omega_j of time feature j (TimeEmbedding in the header comment).
  double frequency(int j) const {
    const int f = config_.time_frequencies;
    if (config_.time_embedding == TimeEmbedding::dyadic)
      return std::numbers::pi * std::ldexp(1.0, j);
    if (f == 1) return config_.frequency_min;
    return config_.frequency_min +
           (config_.frequency_max - config_.frequency_min) * static_cast<double>(j) / (f - 1);
  }

  /// The time features [sin(omega_j tau) | cos(omega_j tau)], tau = time_scale * t.
  Eigen::VectorXd time_features(double t) const {
    Eigen::VectorXd feat;
    write_time_features(t, feat);
    return feat;
  }

  /// Threads for eval and VJPs (fixed blocks: the same bits for every count).
  void set_num_threads(int threads) { threads_ = diffgrad::detail::ThreadHandle(threads); }
  void set_threads(const diffgrad::detail::ThreadHandle& threads) { threads_ = threads; }
  int num_threads() const { return threads_.threads(); }
  /// Rows per block (default kRowBlock). Smaller blocks give many threads work at moderate
  /// batch sizes (T threads need >= T blocks) at some GEMM efficiency; the outputs' last bits
  /// depend on the block size (not on the thread count).
  void set_row_block(Eigen::Index rows) {
    diffgrad::detail::require(rows >= 1 && rows <= (Eigen::Index{1} << 20), "Mlp::set_row_block",
                              "rows", "1..2^20", static_cast<double>(rows));
    row_block_ = rows;
  }
  Eigen::Index row_block() const { return row_block_; }

  /// The network output at model time t: eps for a noise model.
  void eps(const state_type& x, double t, state_type& out) const { forward(x, t, out, "Mlp::eps"); }
  /// The same network read as a velocity field (t = flow time).
  void velocity(const state_type& x, double t, state_type& out) const {
    forward(x, t, out, "Mlp::velocity");
  }

  /// dx = (dy/dx)^T a; *dcond += (dy/dz)^T a and *dparams += (dy/dtheta)^T a, summed over the
  /// batch. dcond / dparams may be null.
  void vjp(const state_type& x, double t, const state_type& a, state_type& dx, vector_type* dcond,
           vector_type* dparams) const {
    backward(x, t, a, dx, dcond, dparams, "Mlp::vjp");
  }
  void velocity_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                    vector_type* dcond, vector_type* dparams) const {
    backward(x, t, a, dx, dcond, dparams, "Mlp::velocity_vjp");
  }
  /// The same network read as an SDE drift f(x, t) (sde/sde.hpp: DifferentiableDriftModel).
  void drift(const state_type& x, double t, state_type& out) const {
    forward(x, t, out, "Mlp::drift");
  }
  void drift_vjp(const state_type& x, double t, const state_type& a, state_type& dx,
                 vector_type* dparams) const {
    backward(x, t, a, dx, nullptr, dparams, "Mlp::drift_vjp");
  }

  /// Writes the network as text:
  ///   diffgrad-mlp 1                  (2 when output_dim or the time embedding is not default)
  ///   dim <d>
  ///   cond_dim <c>
  ///   time_frequencies <F>
  ///   time_scale <s>
  ///   output_dim <n>                   (version 2 only)
  ///   time_embedding dyadic            (version 2 only; or: linear <omega_min> <omega_max>)
  ///   activation <tanh|silu>
  ///   hidden <L> <n_1> ... <n_L>
  ///   params <P>
  ///   <P values, one per line, 17 significant digits, in the flat layout>
  /// A network with the defaults is written as version 1, byte for byte as before.
  void save(std::ostream& os) const {
    os.precision(std::numeric_limits<double>::max_digits10);
    const bool v2 =
        out_dim(config_) != config_.dim || config_.time_embedding != TimeEmbedding::dyadic;
    os << "diffgrad-mlp " << (v2 ? 2 : 1) << "\n"
       << "dim " << config_.dim << "\ncond_dim " << config_.cond_dim << "\ntime_frequencies "
       << config_.time_frequencies << "\ntime_scale " << config_.time_scale;
    if (v2) {
      os << "\noutput_dim " << out_dim(config_) << "\ntime_embedding ";
      if (config_.time_embedding == TimeEmbedding::dyadic)
        os << "dyadic";
      else
        os << "linear " << config_.frequency_min << ' ' << config_.frequency_max;
    }
    os << "\nactivation " << activation_name(config_.activation) << "\nhidden "
       << config_.hidden.size();
    for (int w : config_.hidden) os << ' ' << w;
    os << "\nparams " << param_size_ << '\n';
    for (Eigen::Index i = 0; i < param_size_; ++i) os << static_cast<double>(params_(i)) << '\n';
    if (!os) throw std::runtime_error("Mlp::save: the stream failed while writing");
  }
  void save(const std::string& path) const {
    std::ofstream os(path);
    if (!os) diffgrad::detail::throw_argument("Mlp::save", "path", "a writable file", path);
    save(os);
    // A full disk often shows only when the buffered tail is flushed at close.
    os.close();
    if (!os)
      throw std::runtime_error(
          diffgrad::detail::concat("Mlp::save: writing '", path, "' failed when closing the file"));
  }

  /// Reads what save() wrote (the conditioning vector starts at zero).
  static Mlp load(std::istream& is) {
    const auto fail = [](const std::string& expected, const std::string& got) {
      diffgrad::detail::throw_argument("Mlp::load", "stream", expected, got);
    };
    std::string word;
    int version = 0;
    if (!(is >> word >> version) || word != "diffgrad-mlp" || (version != 1 && version != 2))
      fail("the header 'diffgrad-mlp 1' or 'diffgrad-mlp 2'", word);
    MlpConfig config;
    const auto read_key = [&](const char* key, auto& value) {
      if (!(is >> word) || word != key) fail(std::string("the key '") + key + "'", word);
      if (!(is >> value)) fail(std::string("a value for '") + key + "'", "unreadable text");
    };
    read_key("dim", config.dim);
    read_key("cond_dim", config.cond_dim);
    read_key("time_frequencies", config.time_frequencies);
    read_key("time_scale", config.time_scale);
    if (version == 2) {
      read_key("output_dim", config.output_dim);
      std::string emb;
      read_key("time_embedding", emb);
      if (emb == "linear") {
        config.time_embedding = TimeEmbedding::linear;
        if (!(is >> config.frequency_min >> config.frequency_max))
          fail("two frequencies after 'time_embedding linear'", "unreadable text");
      } else if (emb != "dyadic") {
        fail("time_embedding 'dyadic' or 'linear'", emb);
      }
    }
    std::string act;
    read_key("activation", act);
    if (act == "tanh")
      config.activation = Activation::tanh;
    else if (act == "silu")
      config.activation = Activation::silu;
    else
      fail("activation 'tanh' or 'silu'", act);
    std::size_t layers = 0;
    read_key("hidden", layers);
    if (layers > 1000) fail("at most 1000 hidden layers", std::to_string(layers));
    config.hidden.assign(layers, 0);
    for (auto& w : config.hidden)
      if (!(is >> w)) fail("a hidden-layer width", "unreadable text");
    std::int64_t count = 0;
    read_key("params", count);
    // The layout first (checked arithmetic, nothing allocated), then the values, read before
    // anything of the declared size is allocated: a corrupt header fails by name and a
    // truncated file at its first missing value.
    std::vector<Eigen::Index> widths, offsets;
    const Eigen::Index expected = compute_layout(config, widths, offsets);
    if (count != expected)
      fail(diffgrad::detail::concat(expected, " parameters for this architecture"),
           std::to_string(count));
    std::vector<double> values;
    for (std::int64_t i = 0; i < count; ++i) {
      double v = 0;
      if (!(is >> v)) fail(diffgrad::detail::concat(count, " parameter values"), std::to_string(i));
      values.push_back(v);
    }
    return Mlp(
        config,
        Eigen::Map<const Eigen::VectorXd>(values.data(), count).template cast<Scalar>().eval());
  }
  static Mlp load(const std::string& path) {
    std::ifstream is(path);
    if (!is) diffgrad::detail::throw_argument("Mlp::load", "path", "a readable file", path);
    return load(is);
  }

private:
  using weight_map = Eigen::Map<const matrix_type>;

  void build_layout() {
    param_size_ = compute_layout(config_, widths_, offsets_);
    cond_ = vector_type::Zero(config_.cond_dim);
    const std::size_t layers = widths_.size() - 1;
    pre_.resize(layers);
    act_.resize(layers);
    grad_.resize(layers);
  }

  /// Validates `config` and computes the layer widths, the parameter offsets and the
  /// parameter count without allocating anything of those sizes. Sizes come from user
  /// configs and from files, so every sum and product is checked: an overflow would be
  /// undefined behaviour, and a wrapped count would be allocated and indexed out of bounds.
  static Eigen::Index compute_layout(const MlpConfig& config, std::vector<Eigen::Index>& widths,
                                     std::vector<Eigen::Index>& offsets) {
    namespace d = diffgrad::detail;
    const char* where = "Mlp";
    d::require(config.output_dim >= 0, where, "config.output_dim", ">= 0 (0: the same as dim)",
               config.output_dim);
    d::require(config.dim >= 1 || (config.dim == 0 && config.output_dim >= 1), where, "config.dim",
               ">= 1 (or 0 with output_dim >= 1: a network of t alone)", config.dim);
    d::require(config.time_embedding == TimeEmbedding::dyadic ||
                   (std::isfinite(config.frequency_min) && std::isfinite(config.frequency_max) &&
                    config.frequency_min <= config.frequency_max),
               where, "config.frequency_max",
               "finite frequencies with frequency_min <= frequency_max", config.frequency_max);
    d::require(config.cond_dim >= 0, where, "config.cond_dim", ">= 0", config.cond_dim);
    d::require(config.time_frequencies >= 0 && config.time_frequencies <= 60, where,
               "config.time_frequencies", "0..60", config.time_frequencies);
    d::require(std::isfinite(config.time_scale), where, "config.time_scale", "a finite number",
               config.time_scale);
    // The input width is an int like every other width (the CUDA Mlp hands widths to cuBLAS
    // as int); all three terms are non-negative ints, so the int64 sum cannot overflow.
    const std::int64_t input = std::int64_t{config.dim} +
                               2 * std::int64_t{config.time_frequencies} +
                               std::int64_t{config.cond_dim};
    if (input > std::numeric_limits<int>::max())
      d::throw_argument(where, "config",
                        d::concat("an input width dim + 2 time_frequencies + cond_dim <= ",
                                  std::numeric_limits<int>::max()),
                        d::concat(config.dim, " + 2 * ", config.time_frequencies, " + ",
                                  config.cond_dim, " = ", input));
    d::require(input >= 1, where, "config",
               "an input width dim + 2 time_frequencies + cond_dim >= 1", 0.0);
    widths.assign(1, input);
    for (int w : config.hidden) {
      d::require(w >= 1, where, "config.hidden", "widths >= 1", w);
      widths.push_back(w);
    }
    widths.push_back(out_dim(config));
    offsets.clear();
    // The flat parameter vector must be addressable: its byte size fits std::ptrdiff_t.
    constexpr std::int64_t max_params =
        std::numeric_limits<std::ptrdiff_t>::max() / static_cast<std::int64_t>(sizeof(Scalar));
    std::int64_t total = 0;
    for (std::size_t l = 0; l + 1 < widths.size(); ++l) {
      offsets.push_back(total);
      std::int64_t layer = 0;
      if (!d::checked_mul(widths[l + 1], widths[l] + 1, layer) ||
          !d::checked_add(total, layer, total) || total > max_params)
        d::throw_argument(where, config.hidden.empty() ? "config.dim" : "config.hidden",
                          d::concat("layer widths whose parameter count sum_l n_{l+1} (n_l + 1) "
                                    "is at most ",
                                    max_params, " (the largest addressable array of ",
                                    sizeof(Scalar), "-byte scalars)"),
                          d::concat("a count beyond that at layer ", l, " (", widths[l], " -> ",
                                    widths[l + 1], ")"));
    }
    return total;
  }

  static std::int64_t out_dim(const MlpConfig& c) {
    return c.output_dim > 0 ? c.output_dim : c.dim;
  }
  std::size_t num_layers() const { return widths_.size() - 1; }
  weight_map weight(std::size_t l) const {
    return weight_map(params_.data() + offsets_[l], widths_[l + 1], widths_[l]);
  }
  auto bias(std::size_t l) const {
    return Eigen::Map<const vector_type>(params_.data() + bias_offset(l), widths_[l + 1]);
  }

  void check(const state_type& x, const char* where) const {
    impl::require_state_dim(x, config_.dim, where, "x");
    impl::require_size(cond_, config_.cond_dim, where, "cond (z)");
    impl::require_size(params_, param_size_, where, "params");
  }

  /// feat = the time features at t, computed in double and rounded to feat's scalar; no
  /// allocation when feat already has the size (the member feat_ in a step loop).
  template <class Vector> void write_time_features(double t, Vector& feat) const {
    using Out = typename Vector::Scalar;
    const int f = config_.time_frequencies;
    feat.resize(2 * f);
    const double tau = config_.time_scale * t;
    for (int j = 0; j < f; ++j) {
      const double omega = frequency(j);
      feat(j) = Out(std::sin(omega * tau));
      feat(f + j) = Out(std::cos(omega * tau));
    }
  }

  /// bias0_ = b_0 + W_0[:, d:] [features(t) | z]: the input columns that are the same in every
  /// row (time features, shared conditioning) enter the first layer once per call, not once
  /// per row (for a 2-D PIS drift with 64 time features that is 3/4 of the layer's work).
  void set_first_layer_bias(double t) const {
    write_time_features(t, feat_);
    const Eigen::Index d = config_.dim, f = 2 * config_.time_frequencies, c = config_.cond_dim;
    const auto w0 = weight(0);
    bias0_ = bias(0);
    if (f > 0) bias0_.noalias() += w0.middleCols(d, f) * feat_;
    if (c > 0) bias0_.noalias() += w0.rightCols(c) * cond_;
  }

  /// Rows [r0, r0 + rows) of the first layer's pre-activation: x W_0[:, :d]^T + bias0_.
  template <class Out>
  void first_layer(const state_type& x, Eigen::Index r0, Eigen::Index rows, Out&& out) const {
    out.rowwise() = bias0_.transpose();
    if (config_.dim > 0)
      out.noalias() += x.middleRows(r0, rows) * weight(0).leftCols(config_.dim).transpose();
  }

  /// out = in W_l^T + b_l: b broadcast first, then one accumulating GEMM (no zero fill).
  template <class In, class Out> void affine(std::size_t l, const In& in, Out&& out) const {
    out.rowwise() = bias(l).transpose();
    out.noalias() += in * weight(l).transpose();
  }

  /// act = act(pre); both are whole rows of row-major storage (contiguous), act may be pre.
  template <class Pre, class Act> void activate(const Pre& pre, Act&& act) const {
    if (config_.activation == Activation::tanh) {
      act = pre.array().tanh().matrix();
    } else {
      eigen_assert(pre.outerStride() == pre.cols() && act.outerStride() == act.cols());
      impl::silu(pre.data(), act.data(), pre.size());
    }
  }

  /// A per-thread buffer of at least `count` scalars: grows on first use (or for a wider
  /// network), then is reused, so the forward pass does not allocate in a step loop.
  static Scalar* thread_scratch(std::size_t count) {
    thread_local std::vector<Scalar> buffer;
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
  }

  /// pre_[0] = first_layer(x); pre_[l] = act_[l] W_l^T + b_l (l >= 1); act_[l+1] = act(pre_[l]),
  /// for the whole batch (the VJPs read every layer). act_[0] is not used: the input's shared
  /// columns are folded into bias0_.
  void run_forward(const state_type& x, double t) const {
    const auto batch = x.rows();
    const std::size_t layers = num_layers();
    for (std::size_t l = 0; l < layers; ++l) {
      if (l > 0) act_[l].resize(batch, widths_[l]); // no-op when the batch size is unchanged
      pre_[l].resize(batch, widths_[l + 1]);
    }
    set_first_layer_bias(t);
    impl::for_fixed_blocks(threads_, batch, row_block_, [&](Eigen::Index r0, Eigen::Index rows) {
      for (std::size_t l = 0; l + 1 < layers; ++l) {
        auto pre = pre_[l].middleRows(r0, rows);
        if (l == 0)
          first_layer(x, r0, rows, pre);
        else
          affine(l, act_[l].middleRows(r0, rows), pre);
        activate(pre, act_[l + 1].middleRows(r0, rows));
      }
    });
  }

  /// The output only: each block goes through every layer in the thread's scratch.
  void forward(const state_type& x, double t, state_type& out, const char* where) const {
    check(x, where);
    const Eigen::Index batch = x.rows(), out_cols = widths_.back();
    if (static_cast<const void*>(&out) == static_cast<const void*>(&x) && x.cols() != out_cols)
      diffgrad::detail::throw_argument(
          where, "out", "an object other than x when output_dim differs from dim", "out aliases x");
    out.resize(batch, out_cols); // no-op when out aliases x (same shape)
    set_first_layer_bias(t);
    const std::size_t last = num_layers() - 1;
    const Eigen::Index widest = *std::max_element(widths_.begin() + 1, widths_.end());
    const Eigen::Index block = std::min(row_block_, std::max<Eigen::Index>(batch, 1));
    const auto scratch_size = static_cast<std::size_t>(2 * block * widest);
    impl::for_fixed_blocks(threads_, batch, row_block_, [&](Eigen::Index r0, Eigen::Index rows) {
      Scalar* cur = thread_scratch(scratch_size);
      Scalar* next = cur + block * widest;
      using block_map = Eigen::Map<matrix_type>;
      // Layer 0 reads this block's rows of x before anything of `out` is written (out may be x).
      block_map h0(cur, rows, widths_[1]);
      first_layer(x, r0, rows, h0);
      if (last == 0) { // no hidden layer: the first layer is the output
        out.middleRows(r0, rows) = h0;
        return;
      }
      activate(h0, h0);
      for (std::size_t l = 1; l < last; ++l) {
        block_map h(next, rows, widths_[l + 1]);
        affine(l, block_map(cur, rows, widths_[l]), h);
        activate(h, h);
        std::swap(cur, next);
      }
      affine(last, block_map(cur, rows, widths_[last]), out.middleRows(r0, rows));
    });
  }

  void backward(const state_type& x, double t, const state_type& a, state_type& dx,
                vector_type* dcond, vector_type* dparams, const char* where) const {
    check(x, where);
    if (a.rows() != x.rows() || a.cols() != widths_.back())
      diffgrad::detail::throw_argument(where, "cotangent",
                                       diffgrad::detail::concat("shape ", x.rows(), " x ",
                                                                widths_.back(),
                                                                " (batch x output size)"),
                                       diffgrad::detail::concat(a.rows(), " x ", a.cols()));
    if (dcond) impl::require_size(*dcond, config_.cond_dim, where, "dcond");
    if (dparams) impl::require_size(*dparams, param_size_, where, "dparams");
    run_forward(x, t);
    const std::size_t layers = num_layers();
    for (std::size_t l = 0; l < layers; ++l) grad_[l].resize(x.rows(), widths_[l + 1]);
    grad_[layers - 1] = a; // cotangent of the (linear) output layer's pre-activation
    const Eigen::Index d = config_.dim, f = 2 * config_.time_frequencies, c = config_.cond_dim;
    const auto w0 = weight(0);
    dx.resize(x.rows(), d);
    // Per-row cotangents, layer by layer, in fixed row blocks (a was copied into grad_ above,
    // so a may alias dx).
    impl::for_fixed_blocks(threads_, x.rows(), row_block_, [&](Eigen::Index r0, Eigen::Index rows) {
      for (std::size_t l = layers - 1; l > 0; --l) {
        // Cotangent of pre_[l-1]: (g W_l) .* act'(pre_[l-1]).
        auto prev = grad_[l - 1].middleRows(r0, rows);
        prev.noalias() = grad_[l].middleRows(r0, rows) * weight(l);
        if (config_.activation == Activation::tanh) {
          prev.array() *= (Scalar(1) - act_[l].middleRows(r0, rows).array().square());
        } else {
          const auto pre = pre_[l - 1].middleRows(r0, rows).array();
          const auto s = (Scalar(1) / (Scalar(1) + (-pre).exp()));
          prev.array() *= s * (Scalar(1) + pre * (Scalar(1) - s));
        }
      }
    });
    // Batch sums over fixed blocks of each layer's output neurons (each a GEMM over the batch).
    if (dparams) {
      for (std::size_t l = 0; l < layers; ++l) {
        impl::for_fixed_blocks(
            threads_, widths_[l + 1], impl::kComponentBlock, [&](Eigen::Index j0, Eigen::Index n) {
              Eigen::Map<matrix_type> dw(dparams->data() + offsets_[l], widths_[l + 1], widths_[l]);
              const auto g = grad_[l].middleCols(j0, n);
              // At most kComponentBlock entries: on the stack (no allocation per call).
              const Eigen::Matrix<Scalar, Eigen::Dynamic, 1, Eigen::ColMajor, impl::kComponentBlock,
                                  1>
                  g_sum = g.colwise().sum().transpose();
              auto dw_rows = dw.middleRows(j0, n);
              if (l > 0) {
                dw_rows.noalias() += g.transpose() * act_[l];
              } else { // the first layer's input is [x | features | z]; the last two are shared
                if (d > 0) dw_rows.leftCols(d).noalias() += g.transpose() * x;
                if (f > 0) dw_rows.middleCols(d, f).noalias() += g_sum * feat_.transpose();
                if (c > 0) dw_rows.rightCols(c).noalias() += g_sum * cond_.transpose();
              }
              Eigen::Map<vector_type>(dparams->data() + bias_offset(l) + j0, n) += g_sum;
            });
      }
    }
    if (dcond && c > 0) *dcond += (grad_[0].colwise().sum() * w0.rightCols(c)).transpose();
    // dx last: the first layer's weight gradient above reads x, which dx may alias.
    impl::for_fixed_blocks(threads_, x.rows(), row_block_, [&](Eigen::Index r0, Eigen::Index rows) {
      dx.middleRows(r0, rows).noalias() = grad_[0].middleRows(r0, rows) * w0.leftCols(d);
    });
  }

  MlpConfig config_;
  diffgrad::detail::ThreadHandle threads_{diffgrad::detail::threads_from_environment()};
  Eigen::Index row_block_ = kRowBlock;
  std::vector<Eigen::Index> widths_, offsets_;
  Eigen::Index param_size_ = 0;
  vector_type params_, cond_;
  mutable std::vector<matrix_type> pre_, act_, grad_;
  mutable vector_type feat_;  // time features at the last call's t
  mutable vector_type bias0_; // b_0 + W_0 [features | z] at the last call's t
};

} // namespace diffgrad::models
