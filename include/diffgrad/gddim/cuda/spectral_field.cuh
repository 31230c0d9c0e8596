#pragma once
// The blurring diffusion (BDM) sampler on the GPU with a pixel-space noise model: the device
// counterpart of gddim/spectral_field.hpp (ChannelDct, SpectralEpsField, SpectralEpsVjp) and
// of sample_bdm / gradient_bdm (gddim/bdm_sampler.hpp) for gpu::CudaBackend states.
//
//   field:  eps_y = D eps(D^T y)               (D: the orthonormal 2-D DCT of every channel)
//   VJP:    (d eps_y / d y)^T a = D J^T D^T a
//
// Layout (the CPU's): a state row holds C channels of H x W, channel after channel, each
// row-major; frequency (i, j) of channel ch at column ch H W + i W + j. The B x (C H W)
// row-major batch is therefore N = B C contiguous row-major H x W images, and the transform
// of every image is Y_n = D_H X_n D_W^T (inverse X_n = D_H^T Y_n D_W), as two cuBLAS calls:
//
//   1. Z = M D_W^T with M the whole batch read as ONE row-major (N H) x W matrix (row (n, r)
//      is pixel row r of image n): a single GEMM (cublas.cuh's row-major gemm).
//   2. Y_n = D_H Z_n for n = 0..N-1: one strided-batched GEMM (stride H W, D_H stride 0).
//
// Column-major bookkeeping of step 2 (cuBLAS is column-major; a row-major r x c matrix is the
// column-major c x r transpose in the same memory): the row-major product Y_n = D_H Z_n is
// the column-major Y_n^T = Z_n^T D_H^T, i.e. m = W, n = H, k = H, A = Z_n^T (the memory of
// Z_n, lda = W, op N), B = the memory of D_H read column-major, which IS D_H^T (ldb = H,
// op N), C = Y_n^T (ldc = W). The inverse Y_n -> D_H^T Y_n needs op(B) = D_H there, so op T.
// In-place calls (in == out) are safe: step 1 reads `in` into the scratch, step 2 writes `out`.
// The shape arithmetic is written once (channel_dct_gemms over a "column-major BLAS") and
// checked on the host against the CPU ChannelDct with a reference BLAS
// (tests/cuda/test_cuda_bdm_spectral_host.cu).
//
// No per-call allocation: the transform's scratch and the adapters' pixel buffers are sized
// at construction for a batch; a call with a larger batch grows them once (like the CPU
// adapters). The DCT matrices are built in double (dct2_matrix) and uploaded once, rounded
// to Scalar for the float backend.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <Eigen/Core>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/backend/cuda/cublas.cuh"
#include "diffgrad/backend/cuda/cuda_backend.cuh"
#include "diffgrad/backend/cuda/device_buffer.cuh"
#include "diffgrad/backend/cuda/error.cuh"
#include "diffgrad/core/error.hpp"
#include "diffgrad/gddim/bdm_sampler.hpp"
#include "diffgrad/gddim/dct.hpp"
#include "diffgrad/gradients/discrete_adjoint.hpp"
#include "diffgrad/gradients/vjp_call.hpp"
#include "diffgrad/schedule/node.hpp"
#include "diffgrad/solvers/model_call.hpp"
#include "diffgrad/solvers/sampler.hpp"

namespace diffgrad::gddim {

namespace cuda_spectral_detail {

/// The transform of N = batch * channels row-major H x W images as the two column-major BLAS
/// calls of the header comment. `blas` provides
///   gemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc)            C = op(A) op(B)
///   gemm_strided_batched(transa, transb, m, n, k, A, lda, strideA, B, ldb, strideB,
///                        C, ldc, strideC, count)
/// with alpha = 1, beta = 0, column-major, transa/transb true for op T. dh, dw: the row-major
/// DCT matrices D_H (H x H), D_W (W x W). Returns false as soon as a call fails.
template <class Blas, class Scalar>
bool channel_dct_gemms(Blas& blas, bool inverse, std::int64_t images, std::int64_t h,
                       std::int64_t w, const Scalar* dh, const Scalar* dw, const Scalar* in,
                       Scalar* scratch, Scalar* out) {
  // 1. Row-major Z ((N H) x W) = M op(D_W)  (forward op = T: M D_W^T; inverse: M D_W).
  //    Column-major: Z^T (W x N H) = op(D_W)^T M^T; the memory of row-major D_W read
  //    column-major is D_W^T, so op(D_W)^T = D_W (forward) is op T on that memory, and
  //    op(D_W)^T = D_W^T (inverse) is op N. M^T is `in` as stored (op N, ld W).
  if (!blas.gemm(/*transa=*/!inverse, /*transb=*/false, w, images * h, w, dw, w, in, w, scratch, w))
    return false;
  // 2. Row-major Y_n (H x W) = op(D_H) Z_n  (forward D_H, inverse D_H^T). Column-major:
  //    Y_n^T (W x H) = Z_n^T op(D_H)^T; Z_n^T is the stored Z_n (op N, ld W, stride H W);
  //    D_H's memory is column-major D_H^T, so op(D_H)^T = D_H^T (forward) is op N and
  //    op(D_H)^T = D_H (inverse) is op T; stride 0 (one matrix for every image).
  return blas.gemm_strided_batched(/*transa=*/false, /*transb=*/inverse, w, h, h, scratch, w, h * w,
                                   dh, h, std::int64_t{0}, out, w, h * w, images);
}

/// channel_dct_gemms' BLAS on cuBLAS (double or float).
struct CublasCalls {
  cublasHandle_t handle;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS; ///< of the last call (for the error message)
  static cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }
  static int i(std::int64_t v) { return static_cast<int>(v); }

  bool gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
            std::int64_t lda, const double* b, std::int64_t ldb, double* c, std::int64_t ldc) {
    const double one = 1.0, zero = 0.0;
    status = cublasDgemm(handle, op(ta), op(tb), i(m), i(n), i(k), &one, a, i(lda), b, i(ldb),
                         &zero, c, i(ldc));
    return status == CUBLAS_STATUS_SUCCESS;
  }
  bool gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
            std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc) {
    const float one = 1.0f, zero = 0.0f;
    status = cublasSgemm(handle, op(ta), op(tb), i(m), i(n), i(k), &one, a, i(lda), b, i(ldb),
                         &zero, c, i(ldc));
    return status == CUBLAS_STATUS_SUCCESS;
  }
  bool gemm_strided_batched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k,
                            const double* a, std::int64_t lda, std::int64_t sa, const double* b,
                            std::int64_t ldb, std::int64_t sb, double* c, std::int64_t ldc,
                            std::int64_t sc, std::int64_t count) {
    const double one = 1.0, zero = 0.0;
    status = cublasDgemmStridedBatched(handle, op(ta), op(tb), i(m), i(n), i(k), &one, a, i(lda),
                                       sa, b, i(ldb), sb, &zero, c, i(ldc), sc, i(count));
    return status == CUBLAS_STATUS_SUCCESS;
  }
  bool gemm_strided_batched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k,
                            const float* a, std::int64_t lda, std::int64_t sa, const float* b,
                            std::int64_t ldb, std::int64_t sb, float* c, std::int64_t ldc,
                            std::int64_t sc, std::int64_t count) {
    const float one = 1.0f, zero = 0.0f;
    status = cublasSgemmStridedBatched(handle, op(ta), op(tb), i(m), i(n), i(k), &one, a, i(lda),
                                       sa, b, i(ldb), sb, &zero, c, i(ldc), sc, i(count));
    return status == CUBLAS_STATUS_SUCCESS;
  }
};

/// D (n x n, orthonormal DCT-II) flattened row-major, rounded to Scalar.
template <class Scalar> std::vector<Scalar> row_major_dct(std::int64_t n) {
  const Eigen::MatrixXd d = dct2_matrix(static_cast<Eigen::Index>(n));
  std::vector<Scalar> out(static_cast<std::size_t>(n * n));
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < n; ++c)
      out[static_cast<std::size_t>(r * n + c)] = static_cast<Scalar>(d(r, c));
  return out;
}

template <class Scalar>
void fit(::diffgrad::gpu::DeviceState<Scalar>& s, std::int64_t batch, std::int64_t dim,
         cudaStream_t stream) {
  if (s.batch() != batch || s.dim() != dim)
    s = ::diffgrad::gpu::DeviceState<Scalar>(batch, dim, stream);
}

} // namespace cuda_spectral_detail

/// The orthonormal 2-D DCT-II of every H x W channel block of a B x (C H W) row-major device
/// batch (gddim::ChannelDct's transform, on the backend's stream through cuBLAS). forward /
/// inverse do not allocate for batches up to the constructed one; in and out may be the same
/// state. Not thread-safe on one object (one scratch), like ChannelDct.
template <class Scalar> class CudaChannelDct {
public:
  using backend_type = ::diffgrad::gpu::CudaBackend<Scalar>;
  using state_type = ::diffgrad::gpu::DeviceState<Scalar>;

  /// Uploads D_H and D_W once (synchronously) and sizes the scratch for `batch` rows.
  CudaChannelDct(const backend_type& backend, std::int64_t height, std::int64_t width,
                 std::int64_t channels = 1, std::int64_t batch = 1)
      : stream_(backend.stream()), h_(height), w_(width), c_(channels) {
    const char* where = "CudaChannelDct";
    diffgrad::detail::require(height >= 1, where, "height", "an image height >= 1",
                              static_cast<double>(height));
    diffgrad::detail::require(width >= 1, where, "width", "an image width >= 1",
                              static_cast<double>(width));
    diffgrad::detail::require(channels >= 1, where, "channels", "at least 1 channel",
                              static_cast<double>(channels));
    diffgrad::detail::require(batch >= 0, where, "batch", "a non-negative batch size",
                              static_cast<double>(batch));
    const auto dh = cuda_spectral_detail::row_major_dct<Scalar>(height);
    const auto dw = cuda_spectral_detail::row_major_dct<Scalar>(width);
    dh_ = ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(dh), stream_);
    dw_ = ::diffgrad::gpu::to_device<Scalar>(std::span<const Scalar>(dw), stream_);
    blas_ = std::make_unique<::diffgrad::gpu::CublasHandle>(stream_);
    reserve(batch);
  }

  std::int64_t height() const { return h_; }
  std::int64_t width() const { return w_; }
  std::int64_t channels() const { return c_; }
  std::int64_t plane() const { return h_ * w_; }     ///< H W
  std::int64_t size() const { return c_ * h_ * w_; } ///< C H W: the row length of a batch

  /// out.row(b) = DCT of every channel block of in.row(b); out takes in's shape if needed.
  void forward(const state_type& in, state_type& out) const { apply(in, out, false); }
  /// The inverse (transpose) of forward.
  void inverse(const state_type& in, state_type& out) const { apply(in, out, true); }

  /// Sizes the scratch for batches of up to `batch` rows (allocates only when it grows).
  void reserve(std::int64_t batch) const {
    if (batch * size() > scratch_.size())
      scratch_ = ::diffgrad::gpu::DeviceBuffer<Scalar>(batch * size(), stream_);
  }

private:
  void apply(const state_type& in, state_type& out, bool inverse) const {
    const char* where = inverse ? "CudaChannelDct::inverse" : "CudaChannelDct::forward";
    if (in.dim() != size())
      diffgrad::detail::throw_argument(where, "in",
                                       diffgrad::detail::concat("rows of C H W = ", size(),
                                                                " values (", c_, " channels of ",
                                                                h_, " x ", w_, ")"),
                                       diffgrad::detail::concat(in.dim(), " columns"));
    // cuBLAS takes int sizes: the batch's N H rows of step 1 and the image count.
    if (in.batch() * c_ * h_ > std::numeric_limits<int>::max())
      diffgrad::detail::throw_argument(
          where, "in", "at most 2^31 - 1 image rows (batch * channels * height) per call",
          diffgrad::detail::concat(in.batch(), " x ", c_, " x ", h_));
    reserve(in.batch());
    // (out == in already has the shape: never reallocated, so never freed under us.)
    cuda_spectral_detail::fit(out, in.batch(), in.dim(), stream_);
    if (in.size() == 0) return;
    cuda_spectral_detail::CublasCalls calls{blas_->get()};
    if (!cuda_spectral_detail::channel_dct_gemms(calls, inverse, in.batch() * c_, h_, w_,
                                                 dh_.data(), dw_.data(), in.data(), scratch_.data(),
                                                 out.data()))
      ::diffgrad::gpu::check(calls.status, where, "cuBLAS GEMM (DCT)");
  }

  cudaStream_t stream_;
  std::int64_t h_, w_, c_;
  ::diffgrad::gpu::DeviceVector<Scalar> dh_, dw_;
  std::unique_ptr<::diffgrad::gpu::CublasHandle> blas_;
  mutable ::diffgrad::gpu::DeviceBuffer<Scalar> scratch_;
};

/// The engine's field(y, node, out) for a pixel-space DEVICE noise model: out =
/// DCT(eps(IDCT(y))) (SpectralEpsField's contract on gpu::CudaBackend states). Holds
/// references to the model and the transform: they must outlive the field.
template <class Model, class Scalar> class CudaSpectralEpsField {
public:
  using state_type = ::diffgrad::gpu::DeviceState<Scalar>;

  CudaSpectralEpsField(Model& model, const CudaChannelDct<Scalar>& dct,
                       const ::diffgrad::gpu::CudaBackend<Scalar>& backend, std::int64_t batch = 1)
      : model_(model), dct_(dct), stream_(backend.stream()),
        pix_in_(batch, dct.size(), backend.stream()),
        pix_out_(batch, dct.size(), backend.stream()) {
    dct.reserve(batch);
  }

  void operator()(const state_type& y, const Node& n, state_type& out) {
    cuda_spectral_detail::fit(pix_in_, y.batch(), y.dim(), stream_);
    cuda_spectral_detail::fit(pix_out_, y.batch(), y.dim(), stream_);
    dct_.inverse(y, pix_in_);
    EpsField<Model>{model_}(static_cast<const state_type&>(pix_in_), n, pix_out_);
    if (pix_out_.batch() != y.batch() || pix_out_.dim() != y.dim())
      diffgrad::detail::throw_argument(
          "CudaSpectralEpsField", "model",
          diffgrad::detail::concat("an eps of the input's shape ", y.batch(), " x ", y.dim()),
          diffgrad::detail::concat(pix_out_.batch(), " x ", pix_out_.dim()));
    dct_.forward(pix_out_, out);
  }

private:
  Model& model_;
  const CudaChannelDct<Scalar>& dct_;
  cudaStream_t stream_;
  state_type pix_in_, pix_out_;
};

/// The engine's vjp(y, node, a, dx, dcond, dparams) for a pixel-space differentiable DEVICE
/// noise model: dx = DCT(vjp_pix(IDCT(y), IDCT(a))); dcond / dparams accumulate the model's
/// own gradients at the pixel cotangent IDCT(a) (SpectralEpsVjp's contract).
template <class Model, class Scalar> class CudaSpectralEpsVjp {
public:
  using state_type = ::diffgrad::gpu::DeviceState<Scalar>;

  CudaSpectralEpsVjp(Model& model, const CudaChannelDct<Scalar>& dct,
                     const ::diffgrad::gpu::CudaBackend<Scalar>& backend, std::int64_t batch = 1)
      : model_(model), dct_(dct), stream_(backend.stream()),
        pix_in_(batch, dct.size(), backend.stream()), pix_cot_(batch, dct.size(), backend.stream()),
        pix_dx_(batch, dct.size(), backend.stream()) {
    dct.reserve(batch);
  }

  template <class Vector>
  void operator()(const state_type& y, const Node& n, const state_type& cotangent, state_type& dx,
                  Vector* dcond, Vector* dparams) {
    for (state_type* s : {&pix_in_, &pix_cot_, &pix_dx_})
      cuda_spectral_detail::fit(*s, y.batch(), y.dim(), stream_);
    dct_.inverse(y, pix_in_);
    dct_.inverse(cotangent, pix_cot_);
    EpsVjp<Model>{model_}(static_cast<const state_type&>(pix_in_), n,
                          static_cast<const state_type&>(pix_cot_), pix_dx_, dcond, dparams);
    if (pix_dx_.batch() != y.batch() || pix_dx_.dim() != y.dim())
      diffgrad::detail::throw_argument(
          "CudaSpectralEpsVjp", "model",
          diffgrad::detail::concat("a vjp dx of the input's shape ", y.batch(), " x ", y.dim()),
          diffgrad::detail::concat(pix_dx_.batch(), " x ", pix_dx_.dim()));
    dct_.forward(pix_dx_, dx);
  }

private:
  Model& model_;
  const CudaChannelDct<Scalar>& dct_;
  cudaStream_t stream_;
  state_type pix_in_, pix_cot_, pix_dx_;
};

namespace cuda_spectral_detail {

/// A pixel-space loss seen from the DCT basis: L(IDCT(y0)), dL/dy0 = DCT(dL/dx0).
template <class Scalar, class Loss> struct SpectralLoss {
  using B = ::diffgrad::gpu::CudaBackend<Scalar>;
  using State = ::diffgrad::gpu::DeviceState<Scalar>;
  Loss& loss;
  const CudaChannelDct<Scalar>& dct;
  State& x0;
  State& grad;
  double operator()(const B& backend, const State& y0, State& grad_y) {
    dct.inverse(y0, x0);
    fit(grad, x0.batch(), x0.dim(), backend.stream());
    const double value = static_cast<double>(loss(backend, static_cast<const State&>(x0), grad));
    dct.forward(grad, grad_y);
    return value;
  }
};

} // namespace cuda_spectral_detail

/// sample_bdm for gpu::CudaBackend states (the CPU overload's contract): x holds x_T in pixel
/// space on entry (device, B x C H W) and the pixel-space sample on exit; the scheme runs in
/// the DCT basis with the device model through CudaSpectralEpsField. given_noise (optional,
/// DCT basis) replaces the Philox noise; the observer sees DCT-basis states. Allocates the
/// transform and the adapters' buffers once per call (before the step loop).
template <class Scalar, class Model, class Obs = NullObserver>
SampleResult sample_bdm(const BdmGddim<::diffgrad::gpu::CudaBackend<Scalar>>& scheme,
                        const ::diffgrad::gpu::CudaBackend<Scalar>& backend, Model& model,
                        ::diffgrad::gpu::DeviceState<Scalar>& x, const SampleOptions& options = {},
                        std::span<const ::diffgrad::gpu::DeviceState<Scalar>> given_noise = {},
                        Obs&& observer = {}) {
  using B = ::diffgrad::gpu::CudaBackend<Scalar>;
  if (!scheme.accepts_dim(x.dim()))
    diffgrad::detail::throw_argument("sample_bdm", "x",
                                     diffgrad::detail::concat("rows of ", scheme.dim_requirement()),
                                     diffgrad::detail::concat(x.dim(), " columns"));
  const CudaChannelDct<Scalar> dct(backend, scheme.height(), scheme.width(), scheme.channels(),
                                   x.batch());
  dct.forward(x, x);
  SamplerWorkspace<B> ws(backend, scheme.history(), scheme.stages(), B::batch(x), B::dim(x));
  ws.given_noise = given_noise;
  CudaSpectralEpsField<Model, Scalar> field(model, dct, backend, x.batch());
  const SampleResult r = run_scheme(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field,
                                    x, ws, options, std::forward<Obs>(observer));
  dct.inverse(x, x);
  return r;
}

/// make_bdm_gradient_workspace for gpu::CudaBackend states (x_T: the pixel-space x_T's shape);
/// the allocating gradient_bdm convenience of bdm_sampler.hpp finds it for device states.
template <class Scalar, class Model>
GradientWorkspace<::diffgrad::gpu::CudaBackend<Scalar>>
make_bdm_gradient_workspace(const BdmGddim<::diffgrad::gpu::CudaBackend<Scalar>>& scheme,
                            const ::diffgrad::gpu::CudaBackend<Scalar>& backend, Model& model,
                            const ::diffgrad::gpu::DeviceState<Scalar>& x_T,
                            const GradientOptions& options = {}) {
  using B = ::diffgrad::gpu::CudaBackend<Scalar>;
  if (!scheme.accepts_dim(x_T.dim()))
    diffgrad::detail::throw_argument("make_bdm_gradient_workspace", "x_T",
                                     diffgrad::detail::concat("rows of ", scheme.dim_requirement()),
                                     diffgrad::detail::concat(x_T.dim(), " columns"));
  return GradientWorkspace<B>::for_scheme(backend, scheme, scheme.num_steps(), x_T,
                                          static_cast<std::int64_t>(model.cond_size()),
                                          static_cast<std::int64_t>(model.param_size()), options);
}

/// gradient_bdm for gpu::CudaBackend states (the CPU overload's contract): the exact discrete
/// gradient of loss(x_0) through the BDM sampler, x_0 the pixel-space sample from the
/// pixel-space x_T. `loss`: a LossFunction on pixel device states, or a pixel-space cotangent
/// dL/dx_0 (a DeviceState). On return ws.result holds x0 and grad_x in PIXEL space,
/// grad_cond / grad_params as usual, grad_noise in the DCT basis.
template <class Scalar, class Model, class LossOrCotangent>
const GradientResult<::diffgrad::gpu::CudaBackend<Scalar>>&
gradient_bdm(const BdmGddim<::diffgrad::gpu::CudaBackend<Scalar>>& scheme,
             const ::diffgrad::gpu::CudaBackend<Scalar>& backend, Model& model,
             const ::diffgrad::gpu::DeviceState<Scalar>& x_T, LossOrCotangent&& loss,
             const GradientOptions& options,
             GradientWorkspace<::diffgrad::gpu::CudaBackend<Scalar>>& ws) {
  using State = ::diffgrad::gpu::DeviceState<Scalar>;
  const auto check_pixels = [&](const State& s, const char* arg) {
    if (!scheme.accepts_dim(s.dim()))
      diffgrad::detail::throw_argument(
          "gradient_bdm", arg, diffgrad::detail::concat("rows of ", scheme.dim_requirement()),
          diffgrad::detail::concat(s.dim(), " columns"));
  };
  check_pixels(x_T, "x_T");
  const CudaChannelDct<Scalar> dct(backend, scheme.height(), scheme.width(), scheme.channels(),
                                   x_T.batch());
  State y_T(x_T.batch(), x_T.dim(), backend.stream());
  dct.forward(x_T, y_T);
  CudaSpectralEpsField<Model, Scalar> field(model, dct, backend, x_T.batch());
  CudaSpectralEpsVjp<Model, Scalar> vjp(model, dct, backend, x_T.batch());
  if constexpr (std::is_same_v<std::remove_cvref_t<LossOrCotangent>, State>) {
    check_pixels(loss, "cotangent");
    State cot(loss.batch(), loss.dim(), backend.stream());
    dct.forward(loss, cot);
    discrete_adjoint(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field, vjp, y_T, cot,
                     options, ws);
  } else {
    State x0(x_T.batch(), x_T.dim(), backend.stream());
    State grad(x_T.batch(), x_T.dim(), backend.stream());
    cuda_spectral_detail::SpectralLoss<Scalar, std::remove_reference_t<LossOrCotangent>> spectral{
        loss, dct, x0, grad};
    discrete_adjoint(scheme, backend, scheme.nodes(), scheme.node_at_lambda(), field, vjp, y_T,
                     spectral, options, ws);
  }
  dct.inverse(ws.result.x0, ws.result.x0);
  dct.inverse(ws.result.grad_x, ws.result.grad_x);
  return ws.result;
}

} // namespace diffgrad::gddim
