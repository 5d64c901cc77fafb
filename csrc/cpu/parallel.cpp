#include "parallel.h"

#include <ATen/Parallel.h>

namespace lowprec::cpu {

void parallel_for_range(int64_t begin, int64_t end, int64_t grain_size, RangeFunction function,
                        void* context) {
  at::parallel_for(begin, end, grain_size, [&](int64_t chunk_begin, int64_t chunk_end) {
    function(context, chunk_begin, chunk_end);
  });
}

int64_t max_parallel_workers() {
  return at::get_num_threads();
}

}  // namespace lowprec::cpu
