// Allocation of outputs that a kernel is about to overwrite in full.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pykd {

// On the CPU, large allocations come fresh from mmap, and the first write to each 4 KiB page
// faults: for a gradient of 100+ MB that costs more than the kernel itself. Advising transparent
// huge pages before the first write makes it one fault per 2 MiB (what THP_MEM_ALLOC_ENABLE=1
// does for every torch allocation). It is only advice: without THP support nothing changes.
inline at::Tensor advise_huge_pages(at::Tensor out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!out.is_cpu()) {
    return out;
  }
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

inline at::Tensor empty_for_overwrite(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return advise_huge_pages(at::empty(sizes, options));
}

inline at::Tensor empty_like_for_overwrite(const at::Tensor& like) {
  return advise_huge_pages(at::empty_like(like));
}

}  // namespace pykd
