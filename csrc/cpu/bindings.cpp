// Tensor-level CPU entry points: check, unpack pointers, call the raw-pointer kernels.
#include "../bindings.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "../binding_checks.h"
#include "blockwise8.h"
#include "fourbit.h"

namespace lowprec {

void quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                            const at::Tensor& out_codes, const at::Tensor& out_absmax) {
  constexpr const char* kOp = "quantize_blockwise_cpu";
  check_blockwise_8bit(kOp, c10::DeviceType::CPU, A, out_codes, out_absmax, code, blocksize);
  const FloatType input_type = float_type_of(A, kOp, "A");
  if (A.numel() == 0) return;
  cpu::quantize_blockwise_8bit(A.data_ptr(), input_type, A.numel(), code.data_ptr<float>(),
                               blocksize, out_codes.data_ptr<uint8_t>(),
                               out_absmax.data_ptr<float>());
}

void dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, const at::Tensor& out) {
  constexpr const char* kOp = "dequantize_blockwise_cpu";
  check_blockwise_8bit(kOp, c10::DeviceType::CPU, out, codes, absmax, code, blocksize);
  const FloatType out_type = float_type_of(out, kOp, "out");
  if (codes.numel() == 0) return;
  cpu::dequantize_blockwise_8bit(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                 code.data_ptr<float>(), codes.numel(), blocksize, out.data_ptr(),
                                 out_type);
}

// ------------------------------------------------------------------------------ NF4 / FP4

namespace {

// Bytes of decoded weight rows per GEMM tile: small enough that a tile per thread stays in the
// last-level cache, large enough that the fixed cost of a torch GEMM call (tens of
// microseconds) stays small next to the tile's work (measured: 256 KiB tiles cost ~1.8x,
// 2 MiB tiles ~1.0x the time of one GEMM on the whole weight at M = 16).
constexpr int64_t kGemmTileBytes = int64_t{2} << 20;

// bf16 GEMM path: weight rows per brgemm tile (a 64 x 4096 bf16 tile is 512 KiB: it stays
// in L2 between its decode and its products; 64 rows measured fastest for the microkernel),
// and rows of x per brgemm call (64 and 128 measured alike).
constexpr int64_t kBrgemmTileRows = 64;
constexpr int64_t kBrgemmRows = 64;

// Whether torch's oneDNN brgemm microkernel takes bf16 in VNNI layout here (x86 with
// AVX-512 and a torch built with oneDNN ukernels; mkldnn not disabled by the user). Probed
// once with a 1 x 1 x 2 product: where it is missing, the call raises instead of computing.
bool brgemm_bf16_available() {
  static const bool available = [] {
    try {
      const at::BFloat16 a[2] = {1.0f, 2.0f};
      const at::BFloat16 b[2] = {3.0f, 4.0f};  // VNNI: the pair (k = 0, 1) of column 0
      float c = 0.0f;
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a, b, &c, true);
      at::native::cpublas::brgemm_release(true);
      return c == 11.0f;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return available && at::globalContext().userEnabledMkldnn();
}

cpu::Packed4bit packed_4bit(const at::Tensor& packed, const BlockScales& scales,
                            const at::Tensor& code, int64_t blocksize) {
  return {packed.data_ptr<uint8_t>(), scales, code.data_ptr<float>(), blocksize,
          exact_log2(blocksize)};
}

}  // namespace

void quantize_4bit_cpu(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                       const std::string& quant_type, const at::Tensor& out_packed,
                       const at::Tensor& out_absmax) {
  constexpr const char* kOp = "quantize_4bit_cpu";
  check_tensor(A, kOp, "A", c10::DeviceType::CPU);
  check_tensor(code, kOp, "code", c10::DeviceType::CPU);
  check_tensor(out_packed, kOp, "out_packed", c10::DeviceType::CPU);
  check_tensor(out_absmax, kOp, "out_absmax", c10::DeviceType::CPU);
  const FloatType input_type = float_type_of(A, kOp, "A");
  check_dtype(code, at::kFloat, kOp, "code");
  check_dtype(out_packed, at::kByte, kOp, "out_packed");
  check_dtype(out_absmax, at::kFloat, kOp, "out_absmax");
  check_blocksize_4bit(blocksize, kOp);
  const QuantType4bit type = quant_type_4bit(quant_type, kOp);
  TORCH_CHECK(code.numel() == kCodebookSize4bit, kOp, ": code must have ", kCodebookSize4bit,
              " entries, got ", code.numel());
  const int64_t n = A.numel();
  TORCH_CHECK(out_packed.numel() == (n + 1) / 2, kOp, ": out_packed must have ", (n + 1) / 2,
              " bytes, got ", out_packed.numel());
  TORCH_CHECK(out_absmax.numel() == (n + blocksize - 1) / blocksize, kOp, ": out_absmax must have ",
              (n + blocksize - 1) / blocksize, " elements, got ", out_absmax.numel());
  if (n == 0) return;
  cpu::quantize_4bit(A.data_ptr(), input_type, n, code.data_ptr<float>(), type, blocksize,
                     out_packed.data_ptr<uint8_t>(), out_absmax.data_ptr<float>());
}

void dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                         const at::Tensor& out) {
  constexpr const char* kOp = "dequantize_4bit_cpu";
  check_tensor(out, kOp, "out", c10::DeviceType::CPU);
  const FloatType out_type = float_type_of(out, kOp, "out");
  const int64_t n = out.numel();
  const BlockScales scales =
      check_4bit_weight(kOp, c10::DeviceType::CPU, packed, absmax, code, blocksize, n,
                        nested_absmax, nested_code, offset, nested_blocksize);
  if (n == 0) return;
  cpu::dequantize_4bit(packed_4bit(packed, scales, code, blocksize), n, out.data_ptr(), out_type);
}

void matmul_4bit_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* kOp = "matmul_4bit_gemv_cpu";
  check_matmul_4bit_operands(kOp, c10::DeviceType::CPU, x, packed, bias, out);
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = out.size(1);
  const BlockScales scales = check_4bit_weight(kOp, c10::DeviceType::CPU, packed, absmax, code,
                                               blocksize, out_features * in_features, nested_absmax,
                                               nested_code, offset, nested_blocksize);
  if (rows == 0 || out_features == 0) return;
  const at::Tensor bias_float = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  cpu::matmul_4bit_gemv(x.data_ptr(), float_type_of(x, kOp, "x"), rows,
                        packed_4bit(packed, scales, code, blocksize), out_features, in_features,
                        bias ? bias_float.data_ptr<float>() : nullptr, out.data_ptr());
}

namespace {

// bf16 x on oneDNN's brgemm microkernel: y = x W^T, tile by tile. B = a tile of 64 weight
// rows decoded straight into the microkernel's VNNI layout (bf16 pairs of consecutive k per
// output feature), A = rows of x as they are, C = the tile's columns of y in fp32. Each
// thread decodes its own tiles (512 KiB at in_features 4096: L2 resident) and multiplies
// them; the fp32 result gets the bias and one rounding to bf16 at the end. The microkernel
// is cached per shape, so a tile costs no torch dispatch.
void matmul_4bit_brgemm_bf16(const at::Tensor& x, const cpu::Packed4bit& weight,
                             int64_t out_features, const std::optional<at::Tensor>& bias,
                             const at::Tensor& out) {
  const int64_t rows = x.size(0), in_features = x.size(1);
  const at::Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  const auto* a = static_cast<const at::BFloat16*>(x.data_ptr());
  float* c = y.data_ptr<float>();
  const int64_t num_tiles = (out_features + kBrgemmTileRows - 1) / kBrgemmTileRows;
  at::parallel_for(0, num_tiles, 1, [&](int64_t first, int64_t last) {
    const at::Tensor tile =
        at::empty({in_features / 2, kBrgemmTileRows}, x.options().dtype(at::kInt));
    auto* b = static_cast<uint32_t*>(tile.data_ptr());
    for (int64_t t = first; t < last; ++t) {
      const int64_t n0 = t * kBrgemmTileRows;
      const int64_t n1 = std::min(out_features, n0 + kBrgemmTileRows);
      cpu::dequantize_4bit_tile_vnni(weight, in_features, n0, n1, out_features, b, kBrgemmTileRows);
      for (int64_t m0 = 0; m0 < rows; m0 += kBrgemmRows) {
        const int64_t block_rows = std::min(kBrgemmRows, rows - m0);
        at::native::cpublas::brgemm(block_rows, n1 - n0, in_features, in_features, kBrgemmTileRows,
                                    out_features, false, a + m0 * in_features,
                                    reinterpret_cast<const at::BFloat16*>(b),
                                    c + m0 * out_features + n0, true);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  out.copy_(bias ? y.add(bias->to(at::kFloat)) : y);
}

}  // namespace

// Tiles of weight rows are decoded into a buffer in the compute dtype, then multiplied by
// torch's GEMM (oneDNN / BLAS). The compute dtype is x's, except that fp16 computes in fp32:
// torch's fp16 GEMM on CPUs without AVX512-FP16 is far slower than its fp32 one, and fp32 is
// more accurate. With in_features even the tiles hold rows in split order (even elements,
// then odd: the nibble order, decoded without shuffles) and x's columns are permuted alike.
void matmul_4bit_gemm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* kOp = "matmul_4bit_gemm_cpu";
  check_matmul_4bit_operands(kOp, c10::DeviceType::CPU, x, packed, bias, out);
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = out.size(1);
  const BlockScales scales = check_4bit_weight(kOp, c10::DeviceType::CPU, packed, absmax, code,
                                               blocksize, out_features * in_features, nested_absmax,
                                               nested_code, offset, nested_blocksize);
  if (rows == 0 || out_features == 0) return;
  const cpu::Packed4bit w4 = packed_4bit(packed, scales, code, blocksize);
  if (x.scalar_type() == at::kBFloat16 && cpu::tile_vnni_supported(w4, in_features) &&
      brgemm_bf16_available()) {
    matmul_4bit_brgemm_bf16(x, w4, out_features, bias, out);
    return;
  }
  const at::ScalarType compute = x.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  const FloatType tile_type = compute == at::kBFloat16 ? FloatType::kBFloat16 : FloatType::kFloat32;
  const bool split = in_features % 2 == 0;
  const at::Tensor x_cast = x.to(compute);
  const at::Tensor x_compute =
      split ? at::cat({x_cast.slice(1, 0, in_features, 2), x_cast.slice(1, 1, in_features, 2)}, 1)
            : x_cast;
  const at::Tensor y_compute =
      out.scalar_type() == compute ? out : at::empty(out.sizes(), out.options().dtype(compute));
  const at::Tensor bias_compute = bias ? bias->to(compute) : at::Tensor();
  const int64_t element_bytes = compute == at::kBFloat16 ? 2 : 4;
  const cpu::Packed4bit& weight = w4;
  auto decode = [&](int64_t n0, int64_t n1, void* tile) {
    if (split) {
      cpu::dequantize_4bit_rows_split(weight, in_features, n0, n1, tile, tile_type);
    } else {
      cpu::dequantize_4bit_range(weight, n0 * in_features, n1 * in_features, tile, tile_type);
    }
  };
  auto multiply = [&](const at::Tensor& w_tile, int64_t n0) {
    at::Tensor y_tile = y_compute.narrow(1, n0, w_tile.size(0));
    if (bias) {
      at::addmm_out(y_tile, bias_compute.narrow(0, n0, w_tile.size(0)), x_compute, w_tile.t());
    } else {
      at::mm_out(y_tile, x_compute, w_tile.t());
    }
  };
  // Each thread decodes its own tiles into its own buffer and multiplies them (torch's GEMM
  // runs single-threaded inside the parallel region): no barrier between decode and GEMM,
  // and a tile is read back from the cache of the core that wrote it.
  const int64_t tile_rows =
      std::clamp<int64_t>(kGemmTileBytes / (in_features * element_bytes), 1, out_features);
  const int64_t num_tiles = (out_features + tile_rows - 1) / tile_rows;
  at::parallel_for(0, num_tiles, 1, [&](int64_t first, int64_t last) {
    const at::Tensor tile = at::empty({tile_rows, in_features}, x.options().dtype(compute));
    for (int64_t t = first; t < last; ++t) {
      const int64_t n0 = t * tile_rows;
      const int64_t n1 = std::min(out_features, n0 + tile_rows);
      decode(n0, n1, tile.data_ptr());
      multiply(tile.narrow(0, 0, n1 - n0), n0);
    }
  });
  if (!y_compute.is_same(out)) out.copy_(y_compute);
}

}  // namespace lowprec
