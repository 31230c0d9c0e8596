// Heap-allocation probe for tests that prove a code path does not allocate. Include it FIRST
// in a test program's one translation unit (before any Eigen header), and in no other TU of
// that program: it replaces the global operator new/delete.
//
// Allocations are counted two ways, because Eigen does not use operator new for its dynamic
// matrices (it calls malloc through its own aligned allocator):
//   - every replaceable form of global operator new/delete (plain, array, aligned, nothrow) is
//     replaced and counted while alloc_probe::counting is set. All forms must be replaced: under
//     AddressSanitizer a form left alone comes from ASan's allocator, and the free() below then
//     reports an alloc-dealloc mismatch;
//   - Eigen's EIGEN_RUNTIME_NO_MALLOC hook reports every Eigen heap allocation through
//     eigen_assert, which is redefined here to count instead of aborting.
#pragma once
#ifndef EIGEN_RUNTIME_NO_MALLOC
#define EIGEN_RUNTIME_NO_MALLOC
#endif
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace alloc_probe {
inline std::atomic<bool> counting{false};
inline std::atomic<long> operator_new_calls{0};
inline std::atomic<long> eigen_heap_allocations{0};

// Both kinds together.
inline long total_allocations() {
  return operator_new_calls.load() + eigen_heap_allocations.load();
}

inline void eigen_assert_hook(bool ok, const char* expression, const char* file, int line) {
  if (ok) return;
  if (std::strstr(expression, "heap allocation is forbidden") != nullptr) {
    ++eigen_heap_allocations;
    return;
  }
  std::fprintf(stderr, "%s:%d: Eigen assertion failed: %s\n", file, line, expression);
  std::abort();
}

inline void* allocate(std::size_t size) {
  if (counting.load(std::memory_order_relaxed)) ++operator_new_calls;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
inline void* allocate_aligned(std::size_t size, std::align_val_t align) {
  if (counting.load(std::memory_order_relaxed)) ++operator_new_calls;
  const auto a = static_cast<std::size_t>(align);
  const std::size_t rounded = (size + a - 1) / a * a;
  if (void* p = std::aligned_alloc(a, rounded == 0 ? a : rounded)) return p;
  throw std::bad_alloc();
}
} // namespace alloc_probe

#define eigen_assert(x)                                                                            \
  ::alloc_probe::eigen_assert_hook(static_cast<bool>(x), #x, __FILE__, __LINE__)

// Out of line: when GCC inlines a replacement operator new/delete it pairs the malloc/free
// inside with the caller's new/delete and warns (-Wmismatched-new-delete) about a mismatch
// that this file's replacements make impossible.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
[[gnu::noinline]] void* operator new(std::size_t size) { return alloc_probe::allocate(size); }
[[gnu::noinline]] void* operator new[](std::size_t size) { return alloc_probe::allocate(size); }
[[gnu::noinline]] void* operator new(std::size_t size, std::align_val_t align) {
  return alloc_probe::allocate_aligned(size, align);
}
[[gnu::noinline]] void* operator new[](std::size_t size, std::align_val_t align) {
  return alloc_probe::allocate_aligned(size, align);
}
[[gnu::noinline]] void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return alloc_probe::allocate(size);
  } catch (...) {
    return nullptr;
  }
}
[[gnu::noinline]] void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return alloc_probe::allocate(size);
  } catch (...) {
    return nullptr;
  }
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop
