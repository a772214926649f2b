// The CUDA scheduler's walk (src/kernels/scheduler.cu), run on the host by tests/test_scheduler.py against the
// spec (jax_flashmla/scheduler.py) on any machine with nvcc, no GPU: the same Walker and SequenceWalk the kernel's
// thread 0 runs. Reads cases from stdin, one a line:
//   batch rows split_overhead seqlen_0 ... seqlen_{batch-1}
// and prints per case one line, "invalid" (parameters the launcher refuses), or the metadata's rows * 8 ints
// then the batch + 1 ints of num_splits.
#include <cstdio>
#include <vector>

#define JFM_SCHEDULER_ON_HOST  // scheduler.cu's schedule_on_host
#include "kernels/scheduler.cu"

int main() {
  using namespace jax_flashmla;
  int batch, rows, overhead;
  while (std::scanf("%d %d %d", &batch, &rows, &overhead) == 3) {
    std::vector<int32_t> seqlens(batch > 0 ? batch : 0);
    for (int32_t& length : seqlens)
      if (std::scanf("%d", &length) != 1) return 2;
    std::vector<int32_t> metadata(static_cast<size_t>(rows > 0 ? rows : 0) * kMetadataRowInts, -7);
    std::vector<int32_t> num_splits(seqlens.size() + 1, -7);
    const SchedulerParams params{seqlens.data(), metadata.data(), num_splits.data(), batch, rows, overhead};
    if (!scheduler_params_valid(params)) {
      std::printf("invalid\n");
      continue;
    }
    schedule_on_host(params);
    for (int32_t value : metadata) std::printf("%d ", value);
    for (int32_t value : num_splits) std::printf("%d ", value);
    std::printf("\n");
  }
  return 0;
}
