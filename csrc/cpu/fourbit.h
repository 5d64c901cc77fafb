// NF4 / FP4 on the CPU: quantize, dequantize and the fused dequant-matmul. Raw pointers,
// contiguous data, validated arguments (the bindings check them). The per-element rule is
// lowprec/fourbit.h; AVX-512, AVX2 and scalar paths are chosen at run time (cpu_isa.h).
#pragma once

#include <cstdint>

#include "lowprec/common.h"
#include "lowprec/fourbit.h"

namespace lowprec::cpu {

// A packed 4-bit tensor: two codes per byte (element 2i high nibble), its block scales, the
// 16-entry codebook and the blocksize (a power of two in [32, 4096]).
struct Packed4bit {
  const uint8_t* packed;
  BlockScales scales;
  const float* code;
  int64_t blocksize;
  int blocksize_log2;
};

// packed[(n+1)/2] and absmax[ceil(n / blocksize)] of the n elements of input.
void quantize_4bit(const void* input, FloatType input_type, int64_t n, const float* code,
                   QuantType4bit quant_type, int64_t blocksize, uint8_t* packed, float* absmax);

// out[i] = code[c_i] * scale(i / blocksize) for i in [0, n), rounded to out_type.
void dequantize_4bit(const Packed4bit& weight, int64_t n, void* out, FloatType out_type);

// The decoded elements [begin, end) of the flattened tensor into out[0, end - begin), on the
// calling thread (the GEMM path decodes one tile of weight rows per call).
void dequantize_4bit_range(const Packed4bit& weight, int64_t begin, int64_t end, void* out,
                           FloatType out_type);

// Weight rows [row_begin, row_end) of a weight [rows, in_features] with in_features even,
// decoded on the calling thread in split order: row r of out holds W[n, 0], W[n, 2], ...,
// W[n, K - 2], then W[n, 1], W[n, 3], ..., W[n, K - 1] (n = row_begin + r). That is the order of
// the high and low nibbles, so no shuffle back into element order is needed; the GEMM path
// permutes x's columns the same way, which leaves x @ W.T unchanged.
void dequantize_4bit_rows_split(const Packed4bit& weight, int64_t in_features, int64_t row_begin,
                                int64_t row_end, void* out, FloatType out_type);
// The same for packed bytes [byte_begin, byte_end) of each row (elements 2 byte_begin to
// 2 byte_end - 1): row r of out, 2 (byte_end - byte_begin) elements long, holds the even
// elements of the slice, then the odd ones.
void dequantize_4bit_rows_split_slice(const Packed4bit& weight, int64_t in_features,
                                      int64_t row_begin, int64_t row_end, int64_t byte_begin,
                                      int64_t byte_end, void* out, FloatType out_type);

// Weight rows [row_begin, row_end) as the B operand of a brgemm microkernel computing
// x @ W.T in bf16: VNNI layout, tile[j * ld + (n - row_begin)] holds W[n, 2j] (low 16 bits)
// and W[n, 2j + 1] (high 16 bits) as bf16 rounded to nearest even (bf16 subnormals may flush
// to zero), j < in_features / 2.
// Needs tile_vnni_supported (in_features a multiple of 32 and of the blocksize); runs on the
// calling thread and prefetches the rows of the next tile of the same size (below
// rows_total, the weight's row count), which a thread walking its tiles in order decodes next.
bool tile_vnni_supported(int64_t blocksize, int64_t in_features);
void dequantize_4bit_tile_vnni(const Packed4bit& weight, int64_t in_features, int64_t row_begin,
                               int64_t row_end, int64_t rows_total, uint32_t* tile, int64_t ld);

// The GEMV path of matmul_4bit: y[m, n] = sum_k x[m, k] * W[n, k] + bias[n] for a weight of
// out_features x in_features, accumulated in fp32 and rounded once to x's type: fp32 weights
// and FMA, except for bf16 x on AVX-512 BF16, whose products take the weights rounded to bf16
// (vdpbf16ps). x is [rows, in_features] in x_type, bias fp32 [out_features] or null, y
// [rows, out_features] in x_type. Parallel over output features; made for few rows (it decodes
// each weight block once per group of kGemvRowGroup rows of x).
void matmul_4bit_gemv(const void* x, FloatType x_type, int64_t rows, const Packed4bit& weight,
                      int64_t out_features, int64_t in_features, const float* bias, void* y);

// Rows of x the GEMV kernel multiplies with one decoded weight vector.
constexpr int kGemvRowGroup = 4;

// Whether this CPU runs the AVX-512 BF16 (vdpbf16ps) GEMV for bfloat16 x.
bool gemv_uses_bf16_dot();

}  // namespace lowprec::cpu
