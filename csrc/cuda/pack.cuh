// A 128-bit (or narrower) vector of kVec elements, for aligned vector loads and stores.
#pragma once

namespace resnet_fast {
namespace cuda {

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

}  // namespace cuda
}  // namespace resnet_fast
