// Tensor-level CPU entry points: check, unpack pointers, call the raw-pointer kernels.
#include "../bindings.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cfloat>

#include <vector>

#include "../binding_checks.h"
#include "adam8bit.h"
#include "blockwise8.h"
#include "cpu_isa.h"
#include "fourbit.h"
#include "int8.h"

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

// ------------------------------------------------------------------------------ 8-bit Adam

namespace {

// The tensors themselves where contiguous, else contiguous copies.
std::vector<at::Tensor> contiguous_each(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (const at::Tensor& t : tensors)
    dense.push_back(t.contiguous());
  return dense;
}

// Both multi-steps on validated tensors (a checker ran, or an eager entry accepted them).
void run_adam8bit_multi_step(
    const char* op, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize) {
  const std::vector<at::Tensor> dense_grads = contiguous_each(grads);
  std::vector<cpu::Adam8bitTensor> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    tensors.push_back({params[i].data_ptr(), dense_grads[i].data_ptr(),
                       float_type_of(params[i], op, "param"), params[i].numel(),
                       state1[i].data_ptr<uint8_t>(), state2[i].data_ptr<uint8_t>(),
                       absmax1[i].data_ptr<float>(), absmax2[i].data_ptr<float>(),
                       steps[i].data_ptr<float>(), skipped[i].data_ptr<float>()});
  }
  if (tensors.empty()) return;
  const Adam8bitHyper hyper{adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale),
                            blocksize};
  cpu::adam8bit_multi_step(tensors.data(), static_cast<int64_t>(tensors.size()),
                           qmap1.data_ptr<float>(), qmap2.data_ptr<float>(), hyper);
}

void run_adam_multi_step(const char* op, const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs,
                         const std::vector<at::Tensor>& exp_avg_sqs,
                         const std::vector<at::Tensor>& steps,
                         const std::vector<at::Tensor>& skipped, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool decoupled,
                         double gnorm_scale) {
  const std::vector<at::Tensor> dense_grads = contiguous_each(grads);
  std::vector<cpu::AdamTensor> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    tensors.push_back({params[i].data_ptr(), dense_grads[i].data_ptr(),
                       float_type_of(params[i], op, "param"), params[i].numel(),
                       exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(),
                       steps[i].data_ptr<float>(), skipped[i].data_ptr<float>()});
  }
  if (tensors.empty()) return;
  const AdamHyper hyper = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale);
  cpu::adam_multi_step(tensors.data(), static_cast<int64_t>(tensors.size()), hyper);
}

// The device of an eager call's tensors, if it is the CPU.
bool first_on_cpu(const std::vector<at::Tensor>& params) {
  return !params.empty() && params[0].defined() && params[0].device().is_cpu();
}

}  // namespace

void adam8bit_multi_step_cpu(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize) {
  constexpr const char* kOp = "adam8bit_multi_step_cpu";
  check_adam8bit_multi_step(kOp, c10::DeviceType::CPU, params, grads, state1, state2, absmax1,
                            absmax2, qmap1, qmap2, steps, skipped, blocksize);
  run_adam8bit_multi_step(kOp, params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps,
                          skipped, lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale,
                          blocksize);
}

void adam_multi_step_cpu(const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs,
                         const std::vector<at::Tensor>& exp_avg_sqs,
                         const std::vector<at::Tensor>& steps,
                         const std::vector<at::Tensor>& skipped, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool decoupled,
                         double gnorm_scale) {
  constexpr const char* kOp = "adam_multi_step_cpu";
  check_adam_multi_step(kOp, c10::DeviceType::CPU, params, grads, exp_avgs, exp_avg_sqs, steps,
                        skipped);
  run_adam_multi_step(kOp, params, grads, exp_avgs, exp_avg_sqs, steps, skipped, lr, beta1, beta2,
                      eps, weight_decay, decoupled, gnorm_scale);
}

bool adam8bit_multi_step_eager_cpu(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& state1, const std::vector<at::Tensor>& state2,
    const std::vector<at::Tensor>& absmax1, const std::vector<at::Tensor>& absmax2,
    const at::Tensor& qmap1, const at::Tensor& qmap2, const std::vector<at::Tensor>& steps,
    const std::vector<at::Tensor>& skipped, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool decoupled, double gnorm_scale, int64_t blocksize) {
  if (!first_on_cpu(params) ||
      !adam8bit_multi_step_eager_accepts(params[0].device(), params, grads, state1, state2, absmax1,
                                         absmax2, qmap1, qmap2, steps, skipped, lr, beta1, beta2,
                                         eps, weight_decay, gnorm_scale, blocksize))
    return false;
  run_adam8bit_multi_step("adam8bit_multi_step_eager_cpu", params, grads, state1, state2, absmax1,
                          absmax2, qmap1, qmap2, steps, skipped, lr, beta1, beta2, eps,
                          weight_decay, decoupled, gnorm_scale, blocksize);
  return true;
}

bool adam_multi_step_eager_cpu(const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& grads,
                               const std::vector<at::Tensor>& exp_avgs,
                               const std::vector<at::Tensor>& exp_avg_sqs,
                               const std::vector<at::Tensor>& steps,
                               const std::vector<at::Tensor>& skipped, double lr, double beta1,
                               double beta2, double eps, double weight_decay, bool decoupled,
                               double gnorm_scale) {
  if (!first_on_cpu(params) || !adam_multi_step_eager_accepts(
                                   params[0].device(), params, grads, exp_avgs, exp_avg_sqs, steps,
                                   skipped, lr, beta1, beta2, eps, weight_decay, gnorm_scale))
    return false;
  run_adam_multi_step("adam_multi_step_eager_cpu", params, grads, exp_avgs, exp_avg_sqs, steps,
                      skipped, lr, beta1, beta2, eps, weight_decay, decoupled, gnorm_scale);
  return true;
}

namespace {

void check_codebook_8bit(const at::Tensor& code, const char* op) {
  check_tensor(code, op, "code", c10::DeviceType::CPU);
  check_dtype(code, at::kFloat, op, "code");
  TORCH_CHECK(code.numel() == kCodebookSize8bit, op, ": code must have ", kCodebookSize8bit,
              " entries, got ", code.numel());
}

}  // namespace

void adam8bit_encode_cpu(const at::Tensor& values, const at::Tensor& code, const at::Tensor& out) {
  constexpr const char* kOp = "adam8bit_encode_cpu";
  check_codebook_8bit(code, kOp);
  check_tensor(values, kOp, "values", c10::DeviceType::CPU);
  check_tensor(out, kOp, "out", c10::DeviceType::CPU);
  check_dtype(values, at::kFloat, kOp, "values");
  check_dtype(out, at::kByte, kOp, "out");
  TORCH_CHECK(out.numel() == values.numel(), kOp, ": out must have ", values.numel(),
              " elements, got ", out.numel());
  cpu::adam8bit_encode(values.data_ptr<float>(), values.numel(), code.data_ptr<float>(),
                       out.data_ptr<uint8_t>());
}

bool adam8bit_segmented_encoder_usable(const at::Tensor& code) {
  check_codebook_8bit(code, "adam8bit_segmented_encoder_usable");
  return cpu::adam8bit_segmented_encoder_usable(code.data_ptr<float>());
}

std::tuple<int64_t, int64_t, int64_t> adam8bit_encoder_sweep_cpu(const at::Tensor& code,
                                                                 int64_t stride, int64_t neighbours,
                                                                 double absmax) {
  constexpr const char* kOp = "adam8bit_encoder_sweep_cpu";
  check_codebook_8bit(code, kOp);
  TORCH_CHECK(stride >= 1, kOp, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(neighbours >= 0, kOp, ": neighbours must be >= 0, got ", neighbours);
  const float scale = static_cast<float>(absmax);
  TORCH_CHECK(scale > 0.0f && scale <= FLT_MAX, kOp,
              ": absmax must be a positive finite float32, got ", absmax);
  const cpu::EncoderSweep sweep =
      cpu::adam8bit_encoder_sweep(code.data_ptr<float>(), stride, neighbours, scale);
  return {sweep.checked, sweep.mismatches, static_cast<int64_t>(sweep.first_mismatch_bits)};
}

// ---------------------------------------------------------------------------------- LLM.int8

void int8_quantize_weight_cpu(const at::Tensor& W, const at::Tensor& out_codes,
                              const at::Tensor& out_absmax) {
  constexpr const char* kOp = "int8_quantize_weight_cpu";
  const int64_t cols = check_int8_rows(kOp, c10::DeviceType::CPU, W, out_codes, out_absmax);
  const FloatType type = float_type_of(W, kOp, "W");
  if (W.numel() == 0) return;
  cpu::int8_quantize_rows(W.data_ptr(), type, W.numel() / cols, cols, out_codes.data_ptr<int8_t>(),
                          out_absmax.data_ptr<float>());
}

int64_t int8_vectorwise_quant_cpu(const at::Tensor& A, double threshold,
                                  const at::Tensor& out_codes, const at::Tensor& out_row_absmax,
                                  const at::Tensor& out_cols) {
  constexpr const char* kOp = "int8_vectorwise_quant_cpu";
  const int64_t cols = check_int8_rows(kOp, c10::DeviceType::CPU, A, out_codes, out_row_absmax);
  const FloatType type = float_type_of(A, kOp, "A");
  check_tensor(out_cols, kOp, "out_cols", c10::DeviceType::CPU);
  check_dtype(out_cols, at::kLong, kOp, "out_cols");
  TORCH_CHECK(out_cols.numel() == cols, kOp, ": out_cols must have ", cols, " elements, got ",
              out_cols.numel());
  if (A.numel() == 0) return 0;
  const int64_t rows = A.numel() / cols;
  const std::vector<int64_t> outliers =
      cpu::int8_vectorwise_quant(A.data_ptr(), type, rows, cols, static_cast<float>(threshold),
                                 out_codes.data_ptr<int8_t>(), out_row_absmax.data_ptr<float>());
  std::copy(outliers.begin(), outliers.end(), out_cols.data_ptr<int64_t>());
  return static_cast<int64_t>(outliers.size());
}

namespace {

// Rows of a matrix whose last dimension holds the features (also when that dimension is 0).
int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    rows *= t.size(d);
  return rows;
}

// The pieces of an int8 GEMM call every binding checks: weight, bias, output. Returns N.
int64_t check_int8_gemm_operands(const char* op, const at::Tensor& weight,
                                 const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& out,
                                 int64_t rows, const at::Device& device) {
  check_int8_weight(op, c10::DeviceType::CPU, weight, weight_scale, device);
  const int64_t N = weight.size(0);
  if (bias.has_value()) {
    check_tensor(*bias, op, "bias", c10::DeviceType::CPU);
    check_dtype(*bias, at::kFloat, op, "bias");
    TORCH_CHECK(bias->numel() == N, op, ": bias must have ", N, " elements, got ", bias->numel());
    TORCH_CHECK(bias->device() == device, op, ": bias must be on ", device);
  }
  check_tensor(out, op, "out", c10::DeviceType::CPU);
  float_type_of(out, op, "out");
  TORCH_CHECK(out.numel() == rows * N, op, ": out must have ", rows * N, " elements, got ",
              out.numel());
  TORCH_CHECK(out.device() == device, op, ": out must be on ", device);
  return N;
}

}  // namespace

void int8_scaled_mm_cpu(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& weight,
                        const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                        const at::Tensor& out) {
  constexpr const char* kOp = "int8_scaled_mm_cpu";
  check_tensor(A, kOp, "A", c10::DeviceType::CPU);
  check_dtype(A, at::kChar, kOp, "A");
  check_tensor(row_stats, kOp, "row_stats", c10::DeviceType::CPU);
  check_dtype(row_stats, at::kFloat, kOp, "row_stats");
  TORCH_CHECK(A.dim() >= 1 && weight.dim() == 2 && A.size(-1) == weight.size(1), kOp,
              ": A's last dimension must equal weight's in_features");
  const int64_t K = A.size(-1);
  const int64_t rows = leading_rows(A);
  TORCH_CHECK(row_stats.numel() == rows, kOp, ": row_stats must have ", rows, " elements");
  TORCH_CHECK(row_stats.device() == A.device(), kOp, ": row_stats must be on ", A.device());
  const int64_t N =
      check_int8_gemm_operands(kOp, weight, weight_scale, bias, out, rows, A.device());
  if (rows == 0 || N == 0) return;
  cpu::Int8Epilogue epilogue;
  epilogue.row_stats = row_stats.data_ptr<float>();
  epilogue.col_stats = weight_scale.data_ptr<float>();
  epilogue.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  epilogue.out = out.data_ptr();
  epilogue.out_type = float_type_of(out, kOp, "out");
  cpu::int8_gemm(A.data_ptr<int8_t>(), rows, K, weight.data_ptr<int8_t>(), N, epilogue);
}

void int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& bias, double threshold,
                     const at::Tensor& out) {
  constexpr const char* kOp = "int8_linear_cpu";
  check_tensor(x, kOp, "x", c10::DeviceType::CPU);
  const FloatType x_type = float_type_of(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1), kOp,
              ": x's last dimension must equal weight's in_features");
  const int64_t K = x.size(-1);
  const int64_t rows = leading_rows(x);
  const int64_t N =
      check_int8_gemm_operands(kOp, weight, weight_scale, bias, out, rows, x.device());
  if (rows == 0 || N == 0) return;
  cpu::int8_linear(x.data_ptr(), x_type, rows, K, weight.data_ptr<int8_t>(),
                   weight_scale.data_ptr<float>(), N,
                   bias.has_value() ? bias->data_ptr<float>() : nullptr,
                   static_cast<float>(threshold), out.data_ptr(), float_type_of(out, kOp, "out"));
}

std::string int8_gemm_kernel_cpu(int64_t M) {
  return cpu::int8_gemm_kernel_name(M);
}

// ------------------------------------------------------------------------------ NF4 / FP4

namespace {

// Bytes of decoded weight rows per GEMM tile: small enough that a tile per thread stays in the
// last-level cache, large enough that the fixed cost of a torch GEMM call (tens of
// microseconds) stays small next to the tile's work (measured: 256 KiB tiles cost ~1.8x,
// 2 MiB tiles ~1.0x the time of one GEMM on the whole weight at M = 16, on Zen 5). On an
// Intel Emerald Rapids, fp32 at 4096 x 4096 (M = 64-128) and 11008 x 4096 (M = 64-128) went
// from 1.21-1.58x to 1.04-1.34x that GEMM's time with 4 MiB instead of 2 (twice the rows per
// GEMM call); 8 MiB was worse at in_features 11008.
constexpr int64_t kGemmTileBytes = int64_t{4} << 20;
// Weight rows per GEMM tile at least, whatever in_features: every tile's GEMM reads all of x
// again, so at in_features 11008 fp32 the 47 rows of 2 MiB took Linear4bit to 1.8x
// nn.Linear at M = 256; with 128 rows 0.9-1.04x (2 threads, interleaved; 256 rows measured
// alike). At 4096 fp32 the 4 MiB already hold 256 rows.
constexpr int64_t kGemmMinTileRows = 128;

// bf16 GEMM path: weight rows per brgemm tile (a 64 x 4096 bf16 tile is 512 KiB: it stays
// in L2 between its decode and its products; 64 rows measured fastest for the microkernel),
// and rows of x per brgemm call (64 and 128 measured alike).
constexpr int64_t kBrgemmTileRows = 64;
constexpr int64_t kBrgemmRows = 64;
// in_features per brgemm call: the tile's products go chunk by chunk over k (accumulating in
// C), so the chunk of the tile in use (2048 x 64 bf16, 256 KiB) and the rows of x stay in
// L2. One call over the whole in_features fell from ~510 GFLOP/s at 4096 to 229 at 11008 and
// 109 at 14336 (one core, M = 256); 2048-wide chunks kept ~500 at every width.
constexpr int64_t kBrgemmDepth = 2048;

// Whether torch's oneDNN brgemm microkernel takes bf16 in VNNI layout here (x86 with
// AVX512_BF16 and a torch built with oneDNN ukernels; mkldnn not disabled by the user). Probed
// once with a 1 x 1 x 2 product: where it is missing, the call raises instead of computing.
// The CPU feature is checked first: on AVX-512 without BF16 (Ice Lake, or a hypervisor that
// hides it) the probe's product succeeds but oneDNN refuses larger shapes ("could not
// generate a kernel"), and it would have no bf16 dot product to be fast with anyway.
bool brgemm_bf16_available() {
  // Checked before the probe, which would fail (and be remembered) with mkldnn disabled.
  if (!cpu::cpu_has_avx512_bf16() || !at::globalContext().userEnabledMkldnn()) return false;
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
  return available;
}

// fp32 GEMM path (fp32 x, and fp16 or bf16 x computed in fp32) on the AVX-512 path, up to
// kBrgemmF32MaxRows rows of x and in_features even: oneDNN's fp32 brgemm microkernel computes
// y^T = W x^T, with A a tile of kBrgemmF32TileRows weight rows decoded in split order
// (row-major, as the torch-GEMM path decodes them) and B = x^T in the same order, its columns
// (rows of x) padded to a multiple of kBrgemmF32ColumnAlign. No operand is packed: torch's GEMM
// per tile packed all of x again for every tile. Measured on an Intel Emerald Rapids (2
// threads, 4096 x 4096 NF4, 36 weights rotated past the L3, builds alternated three times):
// 16 / 32 / 64 / 128 rows of x took 3.0-3.1 / 4.5-4.6 / 7.8-8.0 / 14.6-16.4 ms against
// 5.6-5.7 / 7.2-7.5 / 10.7-10.9 / 16.9-17.3 ms for torch's GEMM per 4 MiB tile (the GEMV:
// 3.4 / 6.5 / 13 / 28 ms; F.linear on the dense fp32 weight: 5.0 ms at 16 rows, 15.4-15.6
// at 128). 64-row tiles and 64 columns per call did best among 32-128 rows and 64-256 columns.
constexpr int64_t kBrgemmF32TileRows = 64;
// Tiles are cut down, to no fewer rows than this, so that every thread has one (a narrow
// layer on many threads).
constexpr int64_t kBrgemmF32MinTileRows = 16;
// Packed bytes of each weight row per slice (see matmul_4bit_brgemm_f32): as many as keep the
// slice's rows of x^T within kBrgemmF32SliceBudget bytes, at most kBrgemmF32MaxSliceBytes
// (1024-deep microkernel calls; 4096-deep ones took twice the time).
constexpr int64_t kBrgemmF32SliceBudget = int64_t{512} << 10;
constexpr int64_t kBrgemmF32MaxSliceBytes = 1024;
constexpr int64_t kBrgemmF32Columns = 64;
// oneDNN's kernels for widths that are not a multiple of 16 ran far slower (20 rows of x took
// 4.55 ms, 16 rows 2.68, 32 rows 4.21): the zero columns cost less.
constexpr int64_t kBrgemmF32ColumnAlign = 16;
// Above it, torch's GEMM per tile (192 / 256 / 512 rows: 26.3-27.2 / 27.9-31.3 / 59-68 ms on
// this path against 23.1-23.9 / 31.8-32.9 / 57-58 ms).
constexpr int64_t kBrgemmF32MaxRows = 128;

// Whether the fp32 brgemm path runs: torch built with oneDNN (at::hasMKLDNN; its fp32 brgemm
// call computes with torch's GEMM instead where oneDNN's ukernels are missing, a case not
// measured) and mkldnn not disabled by the user; probed once with a 2 x 16 x 2 product, which
// must not raise. Taken on the AVX-512 path only: on the AVX2 path, with oneDNN held to AVX2,
// it was slower than torch's GEMM per tile at 32-64 rows of x (9.9 / 16.2 against 9.6 / 12.8
// ms).
bool brgemm_f32_available() {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  static const bool available = [] {
    try {
      float a[4] = {1.0f, 2.0f, 3.0f, 4.0f};  // [2][2]
      float b[32];                            // [2][16]
      for (int i = 0; i < 32; ++i)
        b[i] = static_cast<float>(i);
      float c[32];
      at::native::cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      // c[1][3] = 3 * b[0][3] + 4 * b[1][3] = 3 * 3 + 4 * 19; c[0][0] = 1 * 0 + 2 * 16
      return c[16 + 3] == 85.0f && c[0] == 32.0f;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return available;
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
  const auto [input_type, type] =
      check_quantize_4bit("quantize_4bit_cpu", c10::DeviceType::CPU, A, code, blocksize, quant_type,
                          out_packed, out_absmax);
  const int64_t n = A.numel();
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

namespace {

// The checks of both matmul_4bit kernels' bindings; the weight, or nothing when there is
// nothing to compute (no rows of x, no output features).
std::optional<cpu::Packed4bit> checked_matmul_4bit(
    const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
    int64_t nested_blocksize, const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  check_matmul_4bit_operands(op, c10::DeviceType::CPU, x, packed, bias, out);
  const int64_t rows = x.size(0), in_features = x.size(1), out_features = out.size(1);
  const BlockScales scales = check_4bit_weight(op, c10::DeviceType::CPU, packed, absmax, code,
                                               blocksize, out_features * in_features, nested_absmax,
                                               nested_code, offset, nested_blocksize);
  if (rows == 0 || out_features == 0) return std::nullopt;
  if (in_features == 0) {  // empty sums: y = bias, or 0
    if (bias) {
      out.copy_(bias->detach().expand_as(out));
    } else {
      out.zero_();
    }
    return std::nullopt;
  }
  return packed_4bit(packed, scales, code, blocksize);
}

}  // namespace

void matmul_4bit_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* kOp = "matmul_4bit_gemv_cpu";
  const std::optional<cpu::Packed4bit> weight =
      checked_matmul_4bit(kOp, x, packed, absmax, code, blocksize, nested_absmax, nested_code,
                          offset, nested_blocksize, bias, out);
  if (!weight) return;
  const at::Tensor bias_float = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  cpu::matmul_4bit_gemv(x.data_ptr(), float_type_of(x, kOp, "x"), x.size(0), *weight, out.size(1),
                        x.size(1), bias ? bias_float.data_ptr<float>() : nullptr, out.data_ptr());
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
      // k0 stays even (VNNI pairs) and a multiple of 32, as tile_vnni_supported's widths are.
      for (int64_t k0 = 0; k0 < in_features; k0 += kBrgemmDepth) {
        const int64_t depth = std::min(kBrgemmDepth, in_features - k0);
        const auto* b_chunk = reinterpret_cast<const at::BFloat16*>(b + k0 / 2 * kBrgemmTileRows);
        for (int64_t m0 = 0; m0 < rows; m0 += kBrgemmRows) {
          const int64_t block_rows = std::min(kBrgemmRows, rows - m0);
          at::native::cpublas::brgemm(block_rows, n1 - n0, depth, in_features, kBrgemmTileRows,
                                      out_features, /*add_C=*/k0 > 0, a + m0 * in_features + k0,
                                      b_chunk, c + m0 * out_features + n0, true);
        }
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  out.copy_(bias ? y.add(bias->detach().to(at::kFloat)) : y);
}

// x's columns in split order (in_features even): its even elements, then its odd ones, the
// order dequantize_4bit_rows_split decodes a weight row in.
at::Tensor split_order_columns(const at::Tensor& x) {
  const int64_t in_features = x.size(1);
  return at::cat({x.slice(1, 0, in_features, 2), x.slice(1, 1, in_features, 2)}, 1);
}

// The dtype the GEMM path computes in: x's bf16 where torch's bf16 GEMM has a native dot
// product (cpu_bf16_gemm_native), else fp32 (fp16 always, bf16 on x86 without AVX512_BF16).
at::ScalarType gemm_compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && cpu::cpu_bf16_gemm_native() ? at::kBFloat16
                                                                         : at::kFloat;
}

// The fp32 brgemm path (see kBrgemmF32TileRows), for in_features even. Each thread walks the
// packed rows slice by slice (slice_bytes bytes of each row: its even and its odd
// elements, two runs of the split order) and, within a slice, its own tiles: a tile's slice is
// decoded (at most 512 KiB, L2 resident) and multiplied by the slice's rows of x^T (at most
// kBrgemmF32SliceBudget), which stay in L2 across the thread's tiles; y^T accumulates over the
// slices, and gets the bias and one rounding to out's type at the end.
void matmul_4bit_brgemm_f32(const at::Tensor& x, const cpu::Packed4bit& weight,
                            int64_t out_features, const std::optional<at::Tensor>& bias,
                            const at::Tensor& out) {
  const int64_t rows = x.size(0), in_features = x.size(1), half = in_features / 2;
  const int64_t columns =
      (rows + kBrgemmF32ColumnAlign - 1) / kBrgemmF32ColumnAlign * kBrgemmF32ColumnAlign;
  // x^T in split order: row kk holds element 2 kk of x's rows (kk < half), else 2 (kk - half) + 1.
  const at::Tensor xt = at::zeros({in_features, columns}, x.options().dtype(at::kFloat));
  xt.narrow(1, 0, rows).copy_(split_order_columns(x.detach().to(at::kFloat)).t());
  const at::Tensor yt = at::empty({out_features, columns}, x.options().dtype(at::kFloat));
  // Each byte holds two elements, each a row of `columns` floats of x^T.
  const int64_t slice_bytes = std::clamp<int64_t>(
      kBrgemmF32SliceBudget / (2 * columns * int64_t{sizeof(float)}), 1, kBrgemmF32MaxSliceBytes);
  const float* b = xt.data_ptr<float>();
  float* c = yt.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  const int64_t share = (out_features + threads - 1) / threads;
  const int64_t tile_rows = std::clamp<int64_t>(
      (share + kBrgemmF32MinTileRows - 1) / kBrgemmF32MinTileRows * kBrgemmF32MinTileRows,
      kBrgemmF32MinTileRows, kBrgemmF32TileRows);
  const int64_t num_tiles = (out_features + tile_rows - 1) / tile_rows;
  at::parallel_for(0, num_tiles, 1, [&](int64_t first, int64_t last) {
    const at::Tensor tile = at::empty({tile_rows, 2 * slice_bytes}, x.options().dtype(at::kFloat));
    float* a = tile.data_ptr<float>();
    for (int64_t j0 = 0; j0 < half; j0 += slice_bytes) {
      const int64_t slice = std::min(slice_bytes, half - j0);
      for (int64_t t = first; t < last; ++t) {
        const int64_t n0 = t * tile_rows;
        const int64_t n1 = std::min(out_features, n0 + tile_rows);
        cpu::dequantize_4bit_rows_split_slice(weight, in_features, n0, n1, j0, j0 + slice, a,
                                              FloatType::kFloat32);
        // The slice's even elements (rows j0.. of x^T), then its odd ones (rows half + j0..).
        for (int parity = 0; parity < 2; ++parity) {
          const float* b_rows = b + (parity * half + j0) * columns;
          for (int64_t m0 = 0; m0 < columns; m0 += kBrgemmF32Columns) {
            at::native::cpublas::brgemm(n1 - n0, std::min(kBrgemmF32Columns, columns - m0), slice,
                                        2 * slice, columns, columns, /*add_C=*/j0 > 0 || parity > 0,
                                        a + parity * slice, b_rows + m0, c + n0 * columns + m0,
                                        false);
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
  const at::Tensor y = yt.narrow(1, 0, rows).t();
  out.copy_(bias ? y.add(bias->detach().to(at::kFloat)) : y);
}

enum class Gemm4bitKernel { kBrgemmBf16, kBrgemmF32, kTorchGemm };

// Which kernel matmul_4bit_gemm_cpu runs for x (rows, in_features, dtype) and the blocksize.
Gemm4bitKernel gemm_4bit_kernel(const at::Tensor& x, int64_t blocksize) {
  const int64_t rows = x.size(0), in_features = x.size(1);
  if (x.scalar_type() == at::kBFloat16 && cpu::tile_vnni_supported(blocksize, in_features) &&
      brgemm_bf16_available())
    return Gemm4bitKernel::kBrgemmBf16;
  if (gemm_compute_type(x) == at::kFloat && in_features % 2 == 0 && rows <= kBrgemmF32MaxRows &&
      cpu_fp32_brgemm_available())
    return Gemm4bitKernel::kBrgemmF32;
  return Gemm4bitKernel::kTorchGemm;
}

}  // namespace

// Tiles of weight rows are decoded into a buffer in the compute dtype, then multiplied by
// torch's GEMM (oneDNN / BLAS). The compute dtype is x's, except that fp16 computes in fp32,
// and so does bf16 on an x86 CPU without AVX512_BF16 (cpu_bf16_gemm_native): torch's GEMM in
// those dtypes has no native dot product there and is far slower than its fp32 one (bf16 64
// against fp32 367 GFLOP/s at n = 2048 on a 2-core Emerald Rapids VM that hides BF16), and
// fp32 is more accurate. With in_features even the tiles hold rows in split order (even
// elements, then odd: the nibble order, decoded without shuffles) and x's columns are permuted
// alike.
void matmul_4bit_gemm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, int64_t blocksize,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code,
                          const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* kOp = "matmul_4bit_gemm_cpu";
  const std::optional<cpu::Packed4bit> checked =
      checked_matmul_4bit(kOp, x, packed, absmax, code, blocksize, nested_absmax, nested_code,
                          offset, nested_blocksize, bias, out);
  if (!checked) return;
  const int64_t in_features = x.size(1), out_features = out.size(1);
  const cpu::Packed4bit& w4 = *checked;
  switch (gemm_4bit_kernel(x, blocksize)) {
    case Gemm4bitKernel::kBrgemmBf16:
      matmul_4bit_brgemm_bf16(x, w4, out_features, bias, out);
      return;
    case Gemm4bitKernel::kBrgemmF32:
      matmul_4bit_brgemm_f32(x, w4, out_features, bias, out);
      return;
    case Gemm4bitKernel::kTorchGemm:
      break;
  }
  const at::ScalarType compute = gemm_compute_type(x);
  const FloatType tile_type = compute == at::kBFloat16 ? FloatType::kBFloat16 : FloatType::kFloat32;
  const bool split = in_features % 2 == 0;
  // Detached (the kernel computes a value; autograd is the op's business): an operand that
  // requires grad makes the out= GEMMs below refuse to run unless the thread is below
  // autograd. x, or a trainable bias already in the compute dtype, passes .to() unchanged.
  const at::Tensor x_cast = x.detach().to(compute);
  const at::Tensor x_compute = split ? split_order_columns(x_cast) : x_cast;
  const at::Tensor y_compute =
      out.scalar_type() == compute ? out : at::empty(out.sizes(), out.options().dtype(compute));
  const at::Tensor bias_compute = bias ? bias->detach().to(compute) : at::Tensor();
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
  // and a tile is read back from the cache of the core that wrote it. No tile is longer than
  // a thread's share of the rows: a layer of one tile (bf16 at in_features 1000 holds 1048
  // rows) left every thread but one idle.
  const int64_t fitting_rows =
      std::max(kGemmMinTileRows, kGemmTileBytes / (in_features * element_bytes));
  const int64_t threads = at::get_num_threads();
  const int64_t rows_per_thread = (out_features + threads - 1) / threads;
  const int64_t tile_rows = std::clamp<int64_t>(fitting_rows, 1, rows_per_thread);
  const int64_t num_tiles = (out_features + tile_rows - 1) / tile_rows;
  // torch's worker threads do not inherit the caller's thread-local state: without it, a GEMM
  // there refuses to write an output made under inference_mode.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, num_tiles, 1, [&](int64_t first, int64_t last) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
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

std::string matmul_4bit_gemm_kernel_cpu(const at::Tensor& x, int64_t blocksize) {
  switch (gemm_4bit_kernel(x, blocksize)) {
    case Gemm4bitKernel::kBrgemmBf16:
      return "brgemm_bf16";
    case Gemm4bitKernel::kBrgemmF32:
      return "brgemm_f32";
    case Gemm4bitKernel::kTorchGemm:
      break;
  }
  return "torch_gemm";
}

bool cpu_fp32_brgemm_available() {
  return cpu::active_cpu_isa() == cpu::CpuIsa::kAvx512 && brgemm_f32_available();
}

// ------------------------------------------------------------------- matmul_4bit, eager entry

std::optional<at::Tensor> matmul_4bit_eager_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
    int64_t blocksize, const std::vector<int64_t>& shape,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
    const std::optional<at::Tensor>& bias, int64_t gemv_max_rows, std::optional<double> poison) {
  if (!packed.defined() || !packed.device().is_cpu() ||
      !matmul_4bit_eager_accepts(x, packed, absmax, code, blocksize, shape, nested_absmax,
                                 nested_code, offset, nested_blocksize, bias))
    return std::nullopt;
  const int64_t out_features = shape[0], in_features = shape[1];
  at::Tensor out = matmul_4bit_eager_output(x, out_features, poison);
  const at::Tensor x2d = x.reshape({-1, in_features}).contiguous();
  const int64_t rows = x2d.size(0);
  if (rows == 0) return out;
  const std::optional<at::Tensor> bias_dense =
      bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const auto kernel = rows <= gemv_max_rows ? &matmul_4bit_gemv_cpu : &matmul_4bit_gemm_cpu;
  kernel(x2d, packed, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize,
         bias_dense, out.view({rows, out_features}));
  return out;
}

}  // namespace lowprec
