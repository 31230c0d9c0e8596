#pragma once
// MPI basics for diffgrad::mpi: a non-owning communicator handle, an optional RAII
// environment (MPI_Init_thread / MPI_Finalize), error checking of MPI calls, the MPI datatype
// of a scalar, and collective agreement on errors (so one rank's refused input or failed model
// call ends the call on EVERY rank with an exception, instead of leaving the others waiting in
// a collective).
//
// diffgrad calls MPI only from the thread that called the diffgrad::mpi function (the
// backend's own worker threads never do), so MPI_THREAD_FUNNELED is enough.
#include <mpi.h>

#include <climits>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "diffgrad/core/error.hpp"

namespace diffgrad::mpi {

/// An MPI call failed (its error string is in the message). MPI's default error handler
/// (MPI_ERRORS_ARE_FATAL) aborts before this is reached; with MPI_ERRORS_RETURN it is thrown.
class mpi_error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

/// Throws mpi_error naming the call when rc is not MPI_SUCCESS.
inline void check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  throw mpi_error(diffgrad::detail::concat(
      "diffgrad::mpi: ", call, " failed: ", std::string(text, static_cast<std::size_t>(length))));
}

/// Initialises MPI (MPI_THREAD_FUNNELED) unless it already is, and finalises it on
/// destruction if it initialised it. One per process, in main(), before any diffgrad::mpi call.
class Environment {
public:
  Environment(int& argc, char**& argv) {
    int initialized = 0;
    check(MPI_Initialized(&initialized), "MPI_Initialized");
    if (!initialized) {
      int provided = 0;
      check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owns_ = true;
    }
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;
  ~Environment() {
    int finalized = 0;
    if (owns_ && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Finalize();
  }

private:
  bool owns_ = false;
};

/// A communicator (not owned: the caller keeps it alive and frees it).
class Communicator {
public:
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  MPI_Comm get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root(int root = 0) const { return rank_ == root; }
  void barrier() const { check(MPI_Barrier(comm_), "MPI_Barrier"); }

private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

/// The MPI datatype of a scalar type.
template <class Scalar> MPI_Datatype datatype() {
  if constexpr (std::is_same_v<Scalar, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<Scalar, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<Scalar, std::int64_t>) {
    return MPI_INT64_T;
  } else {
    static_assert(std::is_same_v<Scalar, double>, "diffgrad::mpi: no MPI datatype for this type");
  }
}

/// An element count as MPI's int, or a clear error (MPI-3 counts are int).
inline int mpi_count(std::int64_t n, const char* where, const char* what) {
  if (n < 0 || n > INT_MAX)
    diffgrad::detail::throw_argument(
        where, what,
        "at most 2147483647 elements per rank in one MPI call (MPI's int counts): use more ranks "
        "or a smaller batch per call",
        n);
  return static_cast<int>(n);
}

/// Runs `local` (this rank's part of a collective operation) and makes its outcome collective:
/// if it threw on ANY rank, every rank throws: the rank that failed rethrows its own exception,
/// the others a diffgrad::invalid_argument (for a refused input) or a std::runtime_error naming
/// the first failed rank. Every rank must call it at the same point (it is a collective).
template <class F> void agree(const Communicator& comm, const char* where, F&& local) {
  std::exception_ptr failure;
  int input_error = 0;
  try {
    local();
  } catch (const diffgrad::invalid_argument&) {
    failure = std::current_exception();
    input_error = 1;
  } catch (...) {
    failure = std::current_exception();
  }
  // First failed rank (size if none) and whether any rank's failure was a refused input.
  int mine[2] = {failure ? comm.rank() : comm.size(), -input_error};
  int first[2] = {0, 0};
  check(MPI_Allreduce(mine, first, 2, MPI_INT, MPI_MIN, comm.get()), "MPI_Allreduce");
  if (first[0] == comm.size()) return;
  if (failure) std::rethrow_exception(failure);
  const std::string text = diffgrad::detail::concat(
      where, ": rank ", first[0], " of ", comm.size(),
      first[1] < 0 ? " refused its input (its own error names the argument)"
                   : " failed (its own error says why)");
  if (first[1] < 0) throw diffgrad::invalid_argument(text);
  throw std::runtime_error(text);
}

} // namespace diffgrad::mpi
