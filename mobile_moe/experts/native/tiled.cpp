// int4 and int8 weight-only matrix products on x86 CPUs, for mobile-moe (experts/kernels.py: TiledInt4, TiledInt8): an
// AVX512-BF16 path, and an AVX2 + FMA path over the same layout for CPUs without the bf16 dot product (chosen at load).
//
// Layout (written by TiledInt4.from_portable): output rows in tiles of 16, one float lane per row. A tile's codes are
// [in / 8] blocks of 64 bytes; 16-bit word 2r + c of block b holds, in nibble j, the code of row r, column 8b + 2j + c.
// (scale, zero) pairs: bf16 [out / 16, in / group, 16, 2], tile-major so each thread streams its tiles' codes and pairs
// front to back; w = (q - 8) * scale + zero (torch's int4 kernels' convention).
//
// A code q becomes the bf16 value 128 + q by OR-ing it into 0x4300, so one AND/OR and one VDPBF16PS per 32 weights
// multiply 16 rows by two columns of bf16 activations; per group, sum((q - 8) * s + z) x = s * sum((128 + q) x)
// + (z - 136 s) * sum(x). Products of bf16 values are exact in float32; sums are float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace {

float bf16_to_float(uint16_t bits);

constexpr int64_t kTile = 16;       // output rows per tile
constexpr int64_t kBlockCols = 8;   // input columns per 64-byte block
constexpr int64_t kGrain = 4;       // tiles per parallel work item

struct Problem {
  const uint8_t* codes;     // int4: [tiles, in / 8, 64]; int8: [tiles, in / 4, 64]
  const uint32_t* pairs;    // int4: [tiles, groups, 16] (scale, zero) bf16 pairs; int8: [out] bf16 scales
  const uint16_t* x;        // [rows, in] bf16
  const float* xf;          // the same rows in float32 (AVX2 path; null on AVX512)
  const float* xsum;        // [rows, groups] sums of the bf16 activations (int8: one group, the whole row)
  float* y;                 // [rows, out]
  int64_t rows, in, out, group;
};

// Rows m0 .. m0 + R - 1 of x times one tile: each 64-byte block is unpacked once and used by all R rows.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_rows(const Problem& p, int64_t tile, int64_t m0) {
  const __m512i mask = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 offset = _mm512_set1_ps(136.0f);
  const int64_t groups = p.in / p.group, blocks = p.group / kBlockCols;
  const uint8_t* c = p.codes + tile * (p.in / kBlockCols) * 64;
  const uint32_t* xpairs[R];
  __m512 total[R];
  for (int r = 0; r < R; ++r) {
    xpairs[r] = reinterpret_cast<const uint32_t*>(p.x + (m0 + r) * p.in);
    total[r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b, c += 64) {
      const __m512i v = _mm512_loadu_si512(c);
      const __m512i codes[4] = {
          _mm512_ternarylogic_epi32(v, mask, bias, 0xEA),  // (v & mask) | bias
          _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, bias, 0xEA),
          _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), mask, bias, 0xEA),
          _mm512_or_si512(_mm512_srli_epi16(v, 12), bias),
      };
      const int64_t pair = (g * blocks + b) * 4;  // the block's first column pair
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < 4; ++a)
          acc[r][a] = _mm512_dpbf16_ps(acc[r][a], (__m512bh)codes[a], (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xpairs[r][pair + a])));
    }
    const __m512i sz = _mm512_loadu_si512(p.pairs + (tile * groups + g) * kTile);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
    const __m512 corr = _mm512_fnmadd_ps(offset, scale, _mm512_castsi512_ps(_mm512_and_si512(sz, high)));  // zero - 136 scale
    for (int r = 0; r < R; ++r) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
      total[r] = _mm512_fmadd_ps(sum, scale, total[r]);
      total[r] = _mm512_fmadd_ps(corr, _mm512_set1_ps(p.xsum[(m0 + r) * groups + g]), total[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(p.y + (m0 + r) * p.out + tile * kTile, total[r]);
}

// int8, per-row scales: a 64-byte block holds 16 rows x 4 columns, word 2r + c holding u(r, 4b + c) in its low byte and
// u(r, 4b + 2 + c) in its high byte, u = q + 128. Each byte's nibbles go through the int4 trick: sum(u x) =
// 16 sum((128 + hi) x) + sum((128 + lo) x) - 2176 sum(x), so w = s q = s (u - 128) gives s (16 acc_hi + acc_lo - 2304 sum(x)).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void tile_rows_int8(const Problem& p, int64_t tile, int64_t m0) {
  const __m512i mask = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const uint8_t* c = p.codes + tile * (p.in / 4) * 64;
  const uint32_t* xpairs[R];
  __m512 hi[R][2], lo[R][2];
  for (int r = 0; r < R; ++r) {
    xpairs[r] = reinterpret_cast<const uint32_t*>(p.x + (m0 + r) * p.in);
    hi[r][0] = hi[r][1] = lo[r][0] = lo[r][1] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < p.in / 4; ++b, c += 64) {
    const __m512i v = _mm512_loadu_si512(c);
    const __m512i lo0 = _mm512_ternarylogic_epi32(v, mask, bias, 0xEA);  // column pair 2b: low byte's low nibble
    const __m512i hi0 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), mask, bias, 0xEA);
    const __m512i lo1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), mask, bias, 0xEA);  // column pair 2b + 1
    const __m512i hi1 = _mm512_or_si512(_mm512_srli_epi16(v, 12), bias);
    for (int r = 0; r < R; ++r) {
      const __m512bh x0 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xpairs[r][2 * b]));
      const __m512bh x1 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xpairs[r][2 * b + 1]));
      lo[r][0] = _mm512_dpbf16_ps(lo[r][0], (__m512bh)lo0, x0);
      hi[r][0] = _mm512_dpbf16_ps(hi[r][0], (__m512bh)hi0, x0);
      lo[r][1] = _mm512_dpbf16_ps(lo[r][1], (__m512bh)lo1, x1);
      hi[r][1] = _mm512_dpbf16_ps(hi[r][1], (__m512bh)hi1, x1);
    }
  }
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      reinterpret_cast<const uint16_t*>(p.pairs) + tile * kTile))), 16));
  for (int r = 0; r < R; ++r) {
    const __m512 h = _mm512_add_ps(hi[r][0], hi[r][1]), l = _mm512_add_ps(lo[r][0], lo[r][1]);
    const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(-2304.0f), _mm512_set1_ps(p.xsum[m0 + r]), _mm512_fmadd_ps(_mm512_set1_ps(16.0f), h, l));
    _mm512_storeu_ps(p.y + (m0 + r) * p.out + tile * kTile, _mm512_mul_ps(u, scale));
  }
}

// AVX2 + FMA (no bf16 dot product): the same tiles, codes converted to float and multiplied by float activations, two rows
// per register block and two accumulators per half tile (8 rows per ymm), so no chain of dependent FMAs is longer than 4.
template <int R>
__attribute__((target("avx2,fma"))) void tile_rows_avx2(const Problem& p, int64_t tile, int64_t m0) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t groups = p.in / p.group, blocks = p.group / kBlockCols;
  const uint8_t* c = p.codes + tile * (p.in / kBlockCols) * 64;
  __m256 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[R][2][2];
    for (int r = 0; r < R; ++r) acc[r][0][0] = acc[r][0][1] = acc[r][1][0] = acc[r][1][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b, c += 64) {
      const int64_t col = (g * blocks + b) * kBlockCols;
      for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7: dword r holds column 2j (low word) and 2j + 1 (high word) in nibble j
        const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * h));
        for (int j = 0; j < 4; ++j)
          for (int cc = 0; cc < 2; ++cc) {
            const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 16 * cc + 4 * j), mask));
            for (int r = 0; r < R; ++r)
              acc[r][h][cc] = _mm256_fmadd_ps(q, _mm256_broadcast_ss(p.xf + (m0 + r) * p.in + col + 2 * j + cc), acc[r][h][cc]);
          }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i sz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.pairs + (tile * groups + g) * kTile + 8 * h));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
      const __m256 corr = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, _mm256_castsi256_ps(_mm256_and_si256(sz, high)));  // zero - 8 scale
      for (int r = 0; r < R; ++r) {
        total[r][h] = _mm256_fmadd_ps(_mm256_add_ps(acc[r][h][0], acc[r][h][1]), scale, total[r][h]);
        total[r][h] = _mm256_fmadd_ps(corr, _mm256_set1_ps(p.xsum[(m0 + r) * groups + g]), total[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(p.y + (m0 + r) * p.out + tile * kTile + 8 * h, total[r][h]);
}

// int8 on AVX2: dword r of a half block holds, byte k, the u = q + 128 of column 4b + (0, 2, 1, 3)[k]; w = s (u - 128).
template <int R>
__attribute__((target("avx2,fma"))) void tile_rows_int8_avx2(const Problem& p, int64_t tile, int64_t m0) {
  const __m256i mask = _mm256_set1_epi32(0xFF);
  constexpr int kColumn[4] = {0, 2, 1, 3};
  const uint8_t* c = p.codes + tile * (p.in / 4) * 64;
  __m256 acc[R][2][2];
  for (int r = 0; r < R; ++r) acc[r][0][0] = acc[r][0][1] = acc[r][1][0] = acc[r][1][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.in / 4; ++b, c += 64)
    for (int h = 0; h < 2; ++h) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * h));
      for (int k = 0; k < 4; ++k) {
        const __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d, 8 * k), mask));
        for (int r = 0; r < R; ++r)
          acc[r][h][k & 1] = _mm256_fmadd_ps(u, _mm256_broadcast_ss(p.xf + (m0 + r) * p.in + 4 * b + kColumn[k]), acc[r][h][k & 1]);
      }
    }
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(p.pairs) + tile * kTile;
  for (int h = 0; h < 2; ++h) {
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 8 * h))), 16));
    for (int r = 0; r < R; ++r) {
      const __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(-128.0f), _mm256_set1_ps(p.xsum[m0 + r]), _mm256_add_ps(acc[r][h][0], acc[r][h][1]));
      _mm256_storeu_ps(p.y + (m0 + r) * p.out + tile * kTile + 8 * h, _mm256_mul_ps(u, scale));
    }
  }
}

bool lowered_capability() {  // ATEN_CPU_CAPABILITY=avx2 / default: torch's kernels run below AVX512, and so do these
  const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
  return capability != nullptr && (std::string(capability) == "avx2" || std::string(capability) == "default");
}

bool avx512_bf16_cpu() {
  __builtin_cpu_init();  // this runs during the library's static initialisation: the CPU model may not be read yet
  return __builtin_cpu_supports("avx512bf16");
}

// Chosen once, when the library loads: AVX512-BF16 where the CPU has it and ATEN_CPU_CAPABILITY does not lower it.
const bool kAvx512 = avx512_bf16_cpu() && !lowered_capability();

// block(R, m) over rows m .. rows - 1 in register blocks of Max rows, then of fewer for what is left.
template <int Max, class Block>
void by_row_blocks(int64_t m, int64_t rows, const Block& block) {
  for (; m + Max <= rows; m += Max) block(std::integral_constant<int, Max>{}, m);
  if constexpr (Max > 1) by_row_blocks<Max - 1>(m, rows, block);
}

void tile_int4_any(const Problem& p, int64_t t) {
  if (kAvx512)
    by_row_blocks<4>(0, p.rows, [&](auto r, int64_t m) { tile_rows<decltype(r)::value>(p, t, m); });
  else
    by_row_blocks<2>(0, p.rows, [&](auto r, int64_t m) { tile_rows_avx2<decltype(r)::value>(p, t, m); });
}

void tile_int8_any(const Problem& p, int64_t t) {
  if (kAvx512)
    by_row_blocks<4>(0, p.rows, [&](auto r, int64_t m) { tile_rows_int8<decltype(r)::value>(p, t, m); });
  else
    by_row_blocks<2>(0, p.rows, [&](auto r, int64_t m) { tile_rows_int8_avx2<decltype(r)::value>(p, t, m); });
}

std::vector<float> float_rows(const at::Tensor& x) {  // the AVX2 path's float32 activations (empty on AVX512)
  std::vector<float> rows;
  if (kAvx512) return rows;
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  rows.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) rows[i] = bf16_to_float(xb[i]);
  return rows;
}

float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  __builtin_memcpy(&value, &wide, sizeof value);
  return value;
}

void check(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_zeros, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "int4_tiles_mm: x must be contiguous bf16 [M, in]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "int4_tiles_mm: codes must be contiguous uint8 [out, in / 2]");
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous(), "int4_tiles_mm: scale_zeros must be contiguous bf16");
  const int64_t in = x.size(1), out = codes.size(0);
  TORCH_CHECK(codes.size(1) * 2 == in && out % kTile == 0 && group % kBlockCols == 0 && in % group == 0, "int4_tiles_mm: shapes do not fit the tiles");
  TORCH_CHECK(scale_zeros.dim() == 4 && scale_zeros.size(0) == out / kTile && scale_zeros.size(1) == in / group && scale_zeros.size(2) == kTile && scale_zeros.size(3) == 2,
              "int4_tiles_mm: scale_zeros must be [out / 16, in / group, 16, 2]");
}

// x [M, in] bf16, codes [out, in / 2] uint8 in the tile layout, scale_zeros [out / 16, in / group, 16, 2] bf16 -> x @ w.T [M, out] float32
at::Tensor int4_tiles_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_zeros, int64_t group) {
  check(x, codes, scale_zeros, group);
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = in / group;
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> xsum(rows * groups, 0.0f);
  for (int64_t i = 0; i < rows * groups; ++i)
    for (int64_t k = 0; k < group; ++k) xsum[i] += bf16_to_float(xb[i * group + k]);
  const std::vector<float> xf = float_rows(x);
  const Problem p{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(scale_zeros.data_ptr()), xb, xf.data(), xsum.data(),
                  y.data_ptr<float>(), rows, in, out, group};
  at::parallel_for(0, out / kTile, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_int4_any(p, t);
  });
  return y;
}

// One token's experts from a slot pool: x [1 or n, in] bf16 (row i, or the one row, for expert i), codes [S, out, in / 2],
// scale_zeros [S, out / 16, in / group, 16, 2], slots [n] int64 -> y [n, out] float32, y[i] = x_i @ w_{slots[i]}.T; one parallel
// region over every (expert, tile) instead of one per expert.
at::Tensor int4_tiles_experts(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_zeros, const at::Tensor& slots, int64_t group) {
  TORCH_CHECK(codes.dim() == 3 && scale_zeros.dim() == 5 && slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "int4_tiles_experts: pools [S, ...] and slots [n] int64");
  TORCH_CHECK(scale_zeros.stride(0) % 2 == 0, "int4_tiles_experts: each slot's (scale, zero) pairs must start on a pair");
  check(x, codes[0], scale_zeros[0], group);
  const int64_t n = slots.size(0), in = x.size(1), out = codes.size(1), groups = in / group, tiles = out / kTile;
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == n, "int4_tiles_experts: x must have one row or one per expert");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(slot[i] >= 0 && slot[i] < codes.size(0), "int4_tiles_experts: slot out of range");
  at::Tensor y = at::empty({n, out}, x.options().dtype(at::kFloat));
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> xsum(x.size(0) * groups, 0.0f);
  for (int64_t i = 0; i < x.size(0) * groups; ++i)
    for (int64_t k = 0; k < group; ++k) xsum[i] += bf16_to_float(xb[i * group + k]);
  // a slot pool's fields are views into one buffer per slot: slots are stride(0) apart, each slot's field contiguous
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale_zeros.data_ptr());
  const int64_t row = x.size(0) == 1 ? 0 : 1, code_stride = codes.stride(0), pair_stride = scale_zeros.stride(0);
  const std::vector<float> xf = float_rows(x);
  at::parallel_for(0, n * tiles, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / tiles, s = slot[i];
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(sp + s * pair_stride);
      const Problem p{cp + s * code_stride, pairs, xb + i * row * in, xf.data() + (xf.empty() ? 0 : i * row * in), xsum.data() + i * row * groups,
                      y.data_ptr<float>() + i * out, 1, in, out, group};
      tile_int4_any(p, item % tiles);
    }
  });
  return y;
}

std::vector<float> row_sums(const at::Tensor& x) {
  const int64_t rows = x.size(0), in = x.size(1);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  std::vector<float> sums(rows, 0.0f);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < in; ++k) sums[m] += bf16_to_float(xb[m * in + k]);
  return sums;
}

void check_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "int8_tiles_mm: x must be contiguous bf16 [M, in]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "int8_tiles_mm: codes must be contiguous uint8 [out, in]");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "int8_tiles_mm: scales must be contiguous bf16 [out]");
  TORCH_CHECK(codes.size(1) == x.size(1) && x.size(1) % 4 == 0 && codes.size(0) % kTile == 0 && scales.size(0) == codes.size(0), "int8_tiles_mm: shapes do not fit the tiles");
}

// x [M, in] bf16, codes [out, in] uint8 (q + 128) in the int8 tile layout, scales [out] bf16 -> x @ w.T [M, out] float32
at::Tensor int8_tiles_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_int8(x, codes, scales);
  const int64_t out = codes.size(0);
  at::Tensor y = at::empty({x.size(0), out}, x.options().dtype(at::kFloat));
  const std::vector<float> xsum = row_sums(x), xf = float_rows(x);
  const Problem p{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(scales.data_ptr()), reinterpret_cast<const uint16_t*>(x.data_ptr()),
                  xf.data(), xsum.data(), y.data_ptr<float>(), x.size(0), x.size(1), out, x.size(1)};
  at::parallel_for(0, out / kTile, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_int8_any(p, t);
  });
  return y;
}

// int8_tiles_mm for one token's experts from a slot pool (as int4_tiles_experts): codes [S, out, in], scales [S, out]
at::Tensor int8_tiles_experts(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& slots) {
  TORCH_CHECK(codes.dim() == 3 && scales.dim() == 2 && slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "int8_tiles_experts: pools [S, ...] and slots [n] int64");
  check_int8(x, codes[0], scales[0]);
  const int64_t n = slots.size(0), in = x.size(1), out = codes.size(1), tiles = out / kTile;
  TORCH_CHECK(x.size(0) == 1 || x.size(0) == n, "int8_tiles_experts: x must have one row or one per expert");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(slot[i] >= 0 && slot[i] < codes.size(0), "int8_tiles_experts: slot out of range");
  at::Tensor y = at::empty({n, out}, x.options().dtype(at::kFloat));
  const std::vector<float> xsum = row_sums(x), xf = float_rows(x);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const int64_t row = x.size(0) == 1 ? 0 : 1;
  at::parallel_for(0, n * tiles, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / tiles, s = slot[i];
      const uint32_t* scale = reinterpret_cast<const uint32_t*>(sp + s * scales.stride(0));  // read as 16-bit values
      const Problem p{cp + s * codes.stride(0), scale, xb + i * row * in, xf.data() + (xf.empty() ? 0 : i * row * in), xsum.data() + i * row,
                      y.data_ptr<float>() + i * out, 1, in, out, in};
      tile_int8_any(p, item % tiles);
    }
  });
  return y;
}

at::Tensor int8_tiles_mm_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor&) {
  return at::empty({x.size(0), codes.size(0)}, x.options().dtype(at::kFloat));
}

at::Tensor int8_tiles_experts_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor&, const at::Tensor& slots) {
  return at::empty({slots.size(0), codes.size(1)}, x.options().dtype(at::kFloat));
}

at::Tensor int4_tiles_experts_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor&, const at::Tensor& slots, int64_t) {
  return at::empty({slots.size(0), codes.size(1)}, x.options().dtype(at::kFloat));
}

at::Tensor int4_tiles_mm_meta(const at::Tensor& x, const at::Tensor& codes, const at::Tensor&, int64_t) {
  return at::empty({x.size(0), codes.size(0)}, x.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(mobile_moe_native, m) {
  m.def("int4_tiles_mm(Tensor x, Tensor codes, Tensor scale_zeros, int group) -> Tensor");
  m.def("int4_tiles_experts(Tensor x, Tensor codes, Tensor scale_zeros, Tensor slots, int group) -> Tensor");
  m.def("int8_tiles_mm(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int8_tiles_experts(Tensor x, Tensor codes, Tensor scales, Tensor slots) -> Tensor");
}
TORCH_LIBRARY_IMPL(mobile_moe_native, CPU, m) {
  m.impl("int4_tiles_mm", &int4_tiles_mm);
  m.impl("int4_tiles_experts", &int4_tiles_experts);
  m.impl("int8_tiles_mm", &int8_tiles_mm);
  m.impl("int8_tiles_experts", &int8_tiles_experts);
}
TORCH_LIBRARY_IMPL(mobile_moe_native, Meta, m) {
  m.impl("int4_tiles_mm", &int4_tiles_mm_meta);
  m.impl("int4_tiles_experts", &int4_tiles_experts_meta);
  m.impl("int8_tiles_mm", &int8_tiles_mm_meta);
  m.impl("int8_tiles_experts", &int8_tiles_experts_meta);
}
