// Packed weights on transparent huge pages, where RESNET_FAST_HUGE_PAGES=1 asks for them.
//
// A batch-1 ResNet-50 forward streams ~100 MB of packed weights: ~25,000 4 KiB pages, each a TLB miss
// and page walk, 50 2 MiB ones. Where the kernel's THP mode is "madvise" (the usual default) only memory
// marked MADV_HUGEPAGE gets 2 MiB pages, and torch's allocator marks none unless THP_MEM_ALLOC_ENABLE is
// set before it starts. Xeon (AMX, 2 cores), in-process A/B of two copies of one model with packs and
// activation buffers on huge pages: batch-1 forwards 1.013-1.035x faster in four runs, batch 8 0.99x;
// but first calls 1.15x (batch 8) and 1.25x (batch 1) slower (in one process, models made in turn), so
// activation buffers stay on torch's allocator; with packs alone, first calls at batch 8 took as long
// (0.609 vs 0.618 s) and batch-1 forwards were 1.01x faster. Off by default since the Zen 4 (2 cores,
// THP defrag "madvise": a marked range is compacted as it faults): packs on huge pages made first calls
// 0.31 s instead of 0.12 s at batch 1 and ~0.2 s longer at batch 8 (the packs' own time 0.30 s instead of
// 0.10 s), for batch-1 forwards 1.018x faster and batch-8 ones 0.988x. Faulting them in with one
// MADV_POPULATE_WRITE was slower still (batch 1: 0.41 s).

#include "resnet_fast.h"

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace resnet_fast {
namespace cpu {

namespace {

constexpr int64_t kHuge = int64_t{2} << 20;

// Read on every call (allocations here are few: a model's packs).
bool huge_pages_wanted() {
  const char* v = std::getenv("RESNET_FAST_HUGE_PAGES");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace

at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "empty_huge: negative size in ", sizes);
    numel *= s;
  }
  const int64_t nbytes = numel * int64_t(c10::elementSize(dtype));
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Below 2 MiB there is no whole huge page to mark.
  if (huge_pages_wanted() && nbytes >= kHuge) {
    // Mapped with one huge page to spare, so that the range handed out can start on a 2 MiB boundary;
    // only its whole huge pages are marked (a partly used one would hold up to 2 MiB for nothing).
    const size_t length = size_t(nbytes + kHuge);
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      void* data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) / kHuge * kHuge);
      madvise(data, size_t(nbytes / kHuge * kHuge), MADV_HUGEPAGE);  // a hint: where it fails, 4 KiB pages
      return at::from_blob(data, sizes, [base, length](void*) { munmap(base, length); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace resnet_fast
