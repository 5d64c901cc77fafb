// Multithreading for the CPU kernels on PyTorch's intra-op thread pool (at::parallel_for), so
// kernels honour torch.set_num_threads and never start a second OpenMP runtime. The ATen
// header stays in parallel.cpp: kernel files include only this one.
#pragma once

#include <cstdint>

namespace lowprec::cpu {

using RangeFunction = void (*)(void* context, int64_t begin, int64_t end);

void parallel_for_range(int64_t begin, int64_t end, int64_t grain_size, RangeFunction function,
                        void* context);

// The number of threads a parallel_for may use (torch.get_num_threads()).
int64_t max_parallel_workers();

// Calls body(chunk_begin, chunk_end) over disjoint chunks of [begin, end), in parallel when the
// range holds more than grain_size items.
template <typename Body>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const Body& body) {
  parallel_for_range(
      begin, end, grain_size,
      [](void* context, int64_t chunk_begin, int64_t chunk_end) {
        (*static_cast<const Body*>(context))(chunk_begin, chunk_end);
      },
      const_cast<Body*>(&body));
}

}  // namespace lowprec::cpu
