#pragma once
// Device memory for the CUDA backend.
//   DeviceBuffer<T>     RAII, stream-ordered (cudaMallocAsync / cudaFreeAsync), move-only.
//   DeviceState<S>      the batched state: B x d, row-major, contiguous (element (b, j) at
//                       b * d + j, the layout of EigenBackend's state), zero-initialised.
//   DeviceVector<S>     a flat vector (gradients w.r.t. conditioning and parameters).
//   CoefficientTable    an immutable table of doubles (per-grid ColumnCoeff tables), shared
//                       by its copies.
// States and vectors are VALUE types like Eigen matrices: copying one allocates and copies
// on the device (the generic code copies a state only outside step loops). Every allocation,
// copy and free is enqueued on the stream the object was made for (CudaBackend's stream),
// so a state must not outlive its stream. Host <-> device copy helpers at the end are
// synchronous: when they return, the data is where it was asked to be.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "diffgrad/backend/cuda/error.cuh"
#include "diffgrad/core/error.hpp"

namespace diffgrad::gpu {

template <class T> class DeviceBuffer {
public:
  DeviceBuffer() = default;
  /// `count` uninitialised elements on `stream` (count 0: no allocation).
  DeviceBuffer(std::int64_t count, cudaStream_t stream) : size_(count), stream_(stream) {
    if (count < 0)
      diffgrad::detail::throw_argument("DeviceBuffer", "count", "a non-negative element count",
                                       count);
    if (count > 0)
      check(cudaMallocAsync(reinterpret_cast<void**>(&ptr_),
                            static_cast<std::size_t>(count) * sizeof(T), stream),
            "DeviceBuffer", "cudaMallocAsync");
  }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)), stream_(o.stream_) {
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  std::int64_t size() const { return size_; }
  std::size_t bytes() const { return static_cast<std::size_t>(size_) * sizeof(T); }
  cudaStream_t stream() const { return stream_; }

private:
  void release() noexcept {
    // A destructor cannot throw: a failed free (only possible after an earlier fatal
    // device error, which the next checked call reports) is dropped.
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);
    ptr_ = nullptr;
    size_ = 0;
  }
  T* ptr_ = nullptr;
  std::int64_t size_ = 0;
  cudaStream_t stream_ = nullptr;
};

namespace host_detail {
inline void copy_device(void* dst, const void* src, std::size_t bytes, cudaStream_t stream,
                        const char* where) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream), where,
        "cudaMemcpyAsync (device to device)");
}
inline void zero_device(void* dst, std::size_t bytes, cudaStream_t stream, const char* where) {
  if (bytes == 0) return;
  check(cudaMemsetAsync(dst, 0, bytes, stream), where, "cudaMemsetAsync");
}
} // namespace host_detail

/// The batched state on the device: B samples of dimension d, row-major.
template <class Scalar> class DeviceState {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "diffgrad::gpu::DeviceState supports float and double");

public:
  using scalar_type = Scalar;

  DeviceState() = default;
  /// A zero-filled B x d state on `stream`.
  DeviceState(std::int64_t batch, std::int64_t dim, cudaStream_t stream = nullptr)
      : batch_(checked(batch, "batch")), dim_(checked(dim, "dim")), buf_(batch * dim, stream) {
    host_detail::zero_device(buf_.data(), buf_.bytes(), stream, "DeviceState");
  }
  DeviceState(const DeviceState& o) : batch_(o.batch_), dim_(o.dim_), buf_(o.size(), o.stream()) {
    host_detail::copy_device(buf_.data(), o.data(), buf_.bytes(), buf_.stream(),
                             "DeviceState copy");
  }
  DeviceState& operator=(const DeviceState& o) {
    if (this == &o) return *this;
    if (o.size() != size() || buf_.data() == nullptr)
      buf_ = DeviceBuffer<Scalar>(o.size(), o.stream());
    batch_ = o.batch_;
    dim_ = o.dim_;
    host_detail::copy_device(buf_.data(), o.data(), buf_.bytes(), buf_.stream(),
                             "DeviceState copy");
    return *this;
  }
  DeviceState(DeviceState&& o) noexcept
      : batch_(std::exchange(o.batch_, 0)), dim_(std::exchange(o.dim_, 0)),
        buf_(std::move(o.buf_)) {}
  DeviceState& operator=(DeviceState&& o) noexcept {
    batch_ = std::exchange(o.batch_, 0);
    dim_ = std::exchange(o.dim_, 0);
    buf_ = std::move(o.buf_);
    return *this;
  }

  std::int64_t batch() const { return batch_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t size() const { return batch_ * dim_; }
  bool empty() const { return size() == 0; }
  Scalar* data() { return buf_.data(); }
  const Scalar* data() const { return buf_.data(); }
  cudaStream_t stream() const { return buf_.stream(); }

private:
  static std::int64_t checked(std::int64_t n, const char* arg) {
    if (n < 0) diffgrad::detail::throw_argument("DeviceState", arg, "a non-negative size", n);
    return n;
  }
  std::int64_t batch_ = 0, dim_ = 0;
  DeviceBuffer<Scalar> buf_;
};

/// A flat device vector (dL/dcond, dL/dparams, model parameters).
template <class Scalar> class DeviceVector {
public:
  using scalar_type = Scalar;

  DeviceVector() = default;
  /// A zero-filled vector of `size` elements on `stream`.
  explicit DeviceVector(std::int64_t size, cudaStream_t stream = nullptr) : buf_(size, stream) {
    setZero();
  }
  DeviceVector(const DeviceVector& o) : buf_(o.size(), o.stream()) {
    host_detail::copy_device(buf_.data(), o.data(), buf_.bytes(), buf_.stream(),
                             "DeviceVector copy");
  }
  DeviceVector& operator=(const DeviceVector& o) {
    if (this == &o) return *this;
    if (o.size() != size() || buf_.data() == nullptr)
      buf_ = DeviceBuffer<Scalar>(o.size(), o.stream());
    host_detail::copy_device(buf_.data(), o.data(), buf_.bytes(), buf_.stream(),
                             "DeviceVector copy");
    return *this;
  }
  DeviceVector(DeviceVector&&) noexcept = default;
  DeviceVector& operator=(DeviceVector&&) noexcept = default;

  std::int64_t size() const { return buf_.size(); }
  Scalar* data() { return buf_.data(); }
  const Scalar* data() const { return buf_.data(); }
  cudaStream_t stream() const { return buf_.stream(); }
  /// Enqueues a zero fill (the name matches Eigen's, which the generic code detects).
  void setZero() {
    host_detail::zero_device(buf_.data(), buf_.bytes(), buf_.stream(), "DeviceVector");
  }

private:
  DeviceBuffer<Scalar> buf_;
};

/// An immutable table of doubles in device memory: the per-grid coefficient tables that
/// ColumnCoeff::values points into (CudaBackend::make_coefficients), uploaded once, before any
/// step loop. Copies are handles to the SAME device memory (shared ownership), so the pointers
/// a scheme has taken into its table stay valid when the scheme is copied; the memory is freed
/// (stream-ordered, on the stream it was made for) when the last handle goes, so a table must
/// not outlive its stream. (EigenBackend's table is a std::vector: there a copy is new memory.)
class CoefficientTable {
public:
  CoefficientTable() = default;
  /// Uploads `host` on `stream` and waits for the copy (host may be freed on return).
  CoefficientTable(std::span<const double> host, cudaStream_t stream);

  /// Device pointer to entry 0 (null for an empty table); never to be read on the host.
  const double* data() const { return buf_ ? buf_->data() : nullptr; }
  std::int64_t size() const { return buf_ ? buf_->size() : 0; }
  bool empty() const { return size() == 0; }

private:
  std::shared_ptr<const DeviceBuffer<double>> buf_;
};

// --- host <-> device (synchronous) -------------------------------------------------------------

namespace host_detail {
inline void copy_to_device_raw(void* dst, const void* src, std::size_t bytes, cudaStream_t stream,
                               const char* where) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), where,
        "cudaMemcpyAsync (host to device)");
  check(cudaStreamSynchronize(stream), where, "cudaStreamSynchronize");
}
inline void copy_to_host_raw(void* dst, const void* src, std::size_t bytes, cudaStream_t stream,
                             const char* where) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), where,
        "cudaMemcpyAsync (device to host)");
  check(cudaStreamSynchronize(stream), where, "cudaStreamSynchronize");
}
template <class Host, class Device>
void require_same_size(const Host& host, const Device& dev, const char* where) {
  if (static_cast<std::int64_t>(host.size()) != dev.size())
    diffgrad::detail::throw_argument(
        where, "host", diffgrad::detail::concat(dev.size(), " elements"), host.size());
}
} // namespace host_detail

/// Copies row-major host data (B * d values) into an existing state of the same size.
template <class Scalar>
void copy_to_device(std::span<const Scalar> host, DeviceState<Scalar>& dst) {
  host_detail::require_same_size(host, dst, "copy_to_device");
  host_detail::copy_to_device_raw(dst.data(), host.data(), host.size_bytes(), dst.stream(),
                                  "copy_to_device");
}
template <class Scalar>
void copy_to_device(std::span<const Scalar> host, DeviceVector<Scalar>& dst) {
  host_detail::require_same_size(host, dst, "copy_to_device");
  host_detail::copy_to_device_raw(dst.data(), host.data(), host.size_bytes(), dst.stream(),
                                  "copy_to_device");
}

/// A new B x d state holding the row-major host data (host.size() == batch * dim).
template <class Scalar>
DeviceState<Scalar> to_device(std::span<const Scalar> host, std::int64_t batch, std::int64_t dim,
                              cudaStream_t stream = nullptr) {
  if (batch < 0 || dim < 0 || static_cast<std::int64_t>(host.size()) != batch * dim)
    diffgrad::detail::throw_argument(
        "to_device", "host", diffgrad::detail::concat(batch, " x ", dim, " = batch * dim values"),
        host.size());
  DeviceState<Scalar> s(batch, dim, stream);
  copy_to_device(host, s);
  return s;
}
template <class Scalar>
DeviceVector<Scalar> to_device(std::span<const Scalar> host, cudaStream_t stream = nullptr) {
  DeviceVector<Scalar> v(static_cast<std::int64_t>(host.size()), stream);
  copy_to_device(host, v);
  return v;
}

/// Copies a state (row-major) or a vector into host memory of the same size.
template <class Scalar> void copy_to_host(const DeviceState<Scalar>& src, std::span<Scalar> host) {
  host_detail::require_same_size(host, src, "copy_to_host");
  host_detail::copy_to_host_raw(host.data(), src.data(), host.size_bytes(), src.stream(),
                                "copy_to_host");
}
template <class Scalar> void copy_to_host(const DeviceVector<Scalar>& src, std::span<Scalar> host) {
  host_detail::require_same_size(host, src, "copy_to_host");
  host_detail::copy_to_host_raw(host.data(), src.data(), host.size_bytes(), src.stream(),
                                "copy_to_host");
}
template <class Scalar> std::vector<Scalar> to_host(const DeviceState<Scalar>& src) {
  std::vector<Scalar> host(static_cast<std::size_t>(src.size()));
  copy_to_host(src, std::span<Scalar>(host));
  return host;
}
template <class Scalar> std::vector<Scalar> to_host(const DeviceVector<Scalar>& src) {
  std::vector<Scalar> host(static_cast<std::size_t>(src.size()));
  copy_to_host(src, std::span<Scalar>(host));
  return host;
}

inline CoefficientTable::CoefficientTable(std::span<const double> host, cudaStream_t stream) {
  if (host.empty()) return;
  auto buf = std::make_shared<DeviceBuffer<double>>(static_cast<std::int64_t>(host.size()), stream);
  host_detail::copy_to_device_raw(buf->data(), host.data(), host.size_bytes(), stream,
                                  "CoefficientTable");
  buf_ = std::move(buf);
}

} // namespace diffgrad::gpu
