// Host-side checks of the index arithmetic in src/kernels/decode_narrow.cuh, run by tests/test_narrow_layouts.py
// on any machine with nvcc (no GPU): the kernel's hand-written offsets and fragment coordinates against CuTe's
// layouts, and its stmatrix.trans store of P, emulated lane by lane from the PTX ISA's description. Prints
// "ok" and exits 0, or names the first mismatch and exits 1.
#include <cstdio>

#include "kernels/decode_narrow.cuh"

using namespace cute;
using namespace jax_flashmla;
using namespace jax_flashmla::narrow;

static int failures = 0;

#define EXPECT_EQ(a, b, ...)                                                        \
  do {                                                                              \
    const long long a_ = (a), b_ = (b);                                             \
    if (a_ != b_ && failures++ < 10) {                                              \
      std::printf("%s:%d: %s = %lld, expected %lld: ", __FILE__, __LINE__, #a, a_, b_); \
      std::printf(__VA_ARGS__);                                                     \
      std::printf("\n");                                                            \
    }                                                                               \
  } while (0)

// The byte at which a TMA box of 64 rows x 64 16-bit columns with CU_TENSOR_MAP_SWIZZLE_128B puts (row, col).
static int tma_box_offset(int row, int col) { return row * 128 + (((col / 8) ^ (row % 8)) * 16) + (col % 8) * 2; }

// The byte offset of element (a, b) of a shared-memory tensor with this layout at a 1024-byte aligned base: its
// 128-byte swizzle acts on address bits, as on the device.
alignas(1024) static char base[64 * 1024];
template <typename E, typename Layout>
int byte_offset(const Layout& layout, int a, int b) {
  Tensor t = make_tensor(make_smem_ptr(reinterpret_cast<E*>(base)), layout);
  return static_cast<int>(reinterpret_cast<const char*>(&t(a, b)) - base);
}

template <typename E, int kN>
void check_layouts() {
  using L = Layouts<E, kN>;
  // A page tile read as S's A operand (token, dim) and as P V's A operand (dim, token): the bytes TMA wrote.
  for (int token = 0; token < 64; ++token)
    for (int dim = 0; dim < 64; ++dim) {
      EXPECT_EQ(byte_offset<E>(typename L::KTile{}, token, dim), tma_box_offset(token, dim), "KTile(%d, %d)", token,
                dim);
      EXPECT_EQ(byte_offset<E>(typename L::VTile{}, dim, token), tma_box_offset(token, dim), "VTile(%d, %d)", dim,
                token);
    }
  // Q: where the cp.async puts (row, col) is where S's descriptor of its tile reads it. And P (the stmatrix
  // addresses).
  for (int row = 0; row < kN; ++row)
    for (int col = 0; col < kHeadDim; ++col) {
      const int tile = col / 64;
      EXPECT_EQ(q_byte_offset<kN>(0, 64 * tile) + byte_offset<E>(typename L::QTile{}, row, col % 64),
                q_byte_offset<kN>(row, col), "kN %d Q(%d, %d)", kN, row, col);
    }
  for (int row = 0; row < kN; ++row)
    for (int col = 0; col < 64; ++col) {
      EXPECT_EQ(byte_offset<E>(typename L::P{}, row, col), swizzled_row_offset(row, col), "kN %d P(%d, %d)", kN, row,
                col);
    }
}

// fragment_m / fragment_column against CuTe's partition of the C fragment, for S^T and P V's O^T blocks.
template <typename Mma, int kN>
void check_fragment(const Mma& mma, const char* what) {
  Tensor coords = make_identity_tensor(Shape<Int<64>, Int<kN>>{});
  for (int thread = 0; thread < 128; ++thread) {
    Tensor mine = mma.get_thread_slice(thread).partition_C(coords);
    EXPECT_EQ(size(mine), kN / 2, "%s: values per thread", what);
    for (int v = 0; v < size(mine); ++v) {
      const int warp = thread / 32, lane = thread % 32;
      EXPECT_EQ(get<0>(mine(v)), fragment_m(v, lane, warp), "%s thread %d value %d: M", what, thread, v);
      EXPECT_EQ(get<1>(mine(v)), fragment_column(column_index(v), lane), "%s thread %d value %d: N", what, thread, v);
    }
  }
}

// store_p: stmatrix.m8n8.x4.trans stores matrix i's column r (its rows 0..7, two 16-bit halves of the words of
// lanes 4e + r / 2) as the 16 bytes at the address lane 8i + r gives. Each element must land where P holds
// (query row, token) of the S^T value it came from.
template <int kN>
void check_store_p() {
  for (int warp = 0; warp < 4; ++warp)
    for (int k = 0; k < kN / 16; ++k)
      for (int i = 0; i < 4; ++i)
        for (int r = 0; r < 8; ++r) {
          const int address = p_row_address(k, 8 * i + r, warp);
          for (int e = 0; e < 8; ++e) {
            const int lane = 4 * e + r / 2, u = 4 * k + i, v = 2 * u + r % 2;
            const int token = fragment_m(v, lane, warp), column = fragment_column(column_index(v), lane);
            EXPECT_EQ(address + 2 * e, swizzled_row_offset(column, token),
                      "kN %d warp %d matrix %d row %d element %d", kN, warp, u, r, e);
          }
        }
}

template <typename E, int kN>
void check_all() {
  check_layouts<E, kN>();
  auto mma_s = make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<Int<64>, Int<kN>, Int<64>>>());
  auto mma_pv = make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<Int<64>, Int<kN>, Int<64>>, GMMA::Major::MN, GMMA::Major::K>());
  check_fragment<decltype(mma_s), kN>(mma_s, "S^T");
  check_fragment<decltype(mma_pv), kN>(mma_pv, "O^T");
  check_store_p<kN>();
}

int main() {
  check_all<cute::bfloat16_t, 16>();
  check_all<cute::bfloat16_t, 32>();
  check_all<cute::half_t, 16>();
  check_all<cute::half_t, 32>();
  // The ring: every slot's tile is 1024-byte aligned (the 128-byte swizzle's period), and so are Q's and P's.
  EXPECT_EQ(offsetof(SharedStorage<16>, q) % 1024, 0, "q");
  EXPECT_EQ(offsetof(SharedStorage<16>, p) % 1024, 0, "p");
  EXPECT_EQ(offsetof(SharedStorage<32>, q) % 1024, 0, "q");
  EXPECT_EQ(offsetof(SharedStorage<32>, p) % 1024, 0, "p");
  std::printf("ring slots: kN 16: %d, kN 32: %d\n", SharedStorage<16>::kSlots, SharedStorage<32>::kSlots);
  if (failures) {
    std::printf("%d mismatches\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
