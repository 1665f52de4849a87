// int4 and int8 weight-only matrix products on x86 CPUs, for mobile-moe (experts/kernels.py: TiledInt4, TiledInt8): an
// AVX512-BF16 path, and an AVX2 path over the same layout for CPUs without the bf16 dot product (chosen at load), which
// quantizes the activations to int8 per 32 columns and multiplies bytes (VPMADDUBSW), as llama.cpp's CPU kernels do.
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

namespace {

float bf16_to_float(uint16_t bits);
// The order of a code block's columns as the AVX2 path reads them: int4, a dword's low nibbles hold columns (0, 4, 1, 5),
// its high nibbles (2, 6, 3, 7); int8, its bytes hold (0, 2, 1, 3). `shuffle` is the same order as a byte shuffle within
// each 16-byte lane (VPSHUFB) of 32 activations in column order.
struct ColumnOrder {
  int width;        // columns per code block (per dword of one row)
  int columns[8];   // the column each position holds
  alignas(32) int8_t shuffle[32];
};

constexpr ColumnOrder column_order(int width, const int (&columns)[8]) {
  ColumnOrder order{width, {}, {}};
  for (int j = 0; j < 8; ++j) order.columns[j] = columns[j];
  for (int j = 0; j < 32; ++j) order.shuffle[j] = static_cast<int8_t>((j % 16) / width * width + columns[j % width]);
  return order;
}

constexpr ColumnOrder kInt4Order = column_order(8, {0, 4, 1, 5, 2, 6, 3, 7});
constexpr ColumnOrder kInt8Order = column_order(4, {0, 2, 1, 3, 0, 0, 0, 0});

constexpr int64_t kTile = 16;       // output rows per tile
constexpr int64_t kBlockCols = 8;   // input columns per 64-byte block
constexpr int64_t kGrain = 4;       // tiles per parallel work item

struct Problem {
  const uint8_t* codes;     // int4: [tiles, in / 8, 64]; int8: [tiles, in / 4, 64]
  const uint32_t* pairs;    // int4: [tiles, groups, 16] (scale, zero) bf16 pairs; int8: [out] bf16 scales
  const uint16_t* x;        // [rows, in] bf16 (AVX512 path)
  const int8_t* xq;         // AVX2 path: [rows, in] the activations quantized, x^ = xq * xd, in the codes' column order
  const float* xd;          // AVX2 path: [rows, in / xblock] their scales
  const float* xsum;        // [rows, groups] sums of the activations as multiplied (int8: one group, the whole row)
  float* y;                 // [rows, out]
  int64_t rows, in, out, group, xblock;
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

// AVX2 (no bf16 dot product): the activations are quantized to int8 per block of 32 columns (scale max|x| / 127, as
// llama.cpp's Q8_0) and VPMADDUBSW multiplies 32 codes by 32 of them at once, 16-bit sums taken into 32 bits once per
// block; the products are exact, so the result is w times the quantized activations x^ (Activations::quantize),
// float32 sums per block. The codes are the same tiles: dword r of a half block (8 rows) holds row r's 8 columns, its
// low nibbles columns (0, 4, 1, 5) and its high nibbles (2, 6, 3, 7); x^ is stored in that order.
template <int R>
__attribute__((target("avx2,fma"))) void tile_rows_avx2(const Problem& p, int64_t tile, int64_t m0) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const int64_t groups = p.in / p.group, per_group = p.group / p.xblock, steps = p.xblock / kBlockCols, xblocks = p.in / p.xblock;
  const uint8_t* c = p.codes + tile * (p.in / kBlockCols) * 64;
  __m256 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = g * per_group; k < (g + 1) * per_group; ++k) {  // x block k: at most 4 code blocks, so 16 bits hold the sums
      __m256i sums[R][2];
      for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
      for (int64_t s = 0; s < steps; ++s, c += 64) {
        const int64_t b = k * steps + s;  // the code block
        const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
        const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32));
        const __m256i lo0 = _mm256_and_si256(d0, mask), hi0 = _mm256_and_si256(_mm256_srli_epi16(d0, 4), mask);
        const __m256i lo1 = _mm256_and_si256(d1, mask), hi1 = _mm256_and_si256(_mm256_srli_epi16(d1, 4), mask);
        for (int r = 0; r < R; ++r) {
          const int32_t* xq = reinterpret_cast<const int32_t*>(p.xq + (m0 + r) * p.in);
          const __m256i xlo = _mm256_set1_epi32(xq[2 * b]), xhi = _mm256_set1_epi32(xq[2 * b + 1]);
          sums[r][0] = _mm256_add_epi16(sums[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xlo), _mm256_maddubs_epi16(hi0, xhi)));
          sums[r][1] = _mm256_add_epi16(sums[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xlo), _mm256_maddubs_epi16(hi1, xhi)));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 d = _mm256_set1_ps(p.xd[(m0 + r) * xblocks + k]);
        for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r][h], ones)), d, acc[r][h]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i sz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.pairs + (tile * groups + g) * kTile + 8 * h));
      const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
      const __m256 corr = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), scale, _mm256_castsi256_ps(_mm256_and_si256(sz, high)));  // zero - 8 scale
      for (int r = 0; r < R; ++r) {
        total[r][h] = _mm256_fmadd_ps(acc[r][h], scale, total[r][h]);
        total[r][h] = _mm256_fmadd_ps(corr, _mm256_set1_ps(p.xsum[(m0 + r) * groups + g]), total[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(p.y + (m0 + r) * p.out + tile * kTile + 8 * h, total[r][h]);
}

// int8 on AVX2: dword r of a half block holds, byte k, the u = q + 128 of column 4b + (0, 2, 1, 3)[k]; w = s q. With
// q = u ^ 0x80 (never -128: the quantizer clamps to +-127) VPMADDUBSW takes |x^| and q with x^'s sign, as llama.cpp's
// q8 dot products do; 32-bit sums per block of x^.
template <int R>
__attribute__((target("avx2,fma"))) void tile_rows_int8_avx2(const Problem& p, int64_t tile, int64_t m0) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t steps = p.xblock / 4, xblocks = p.in / p.xblock;
  const uint8_t* c = p.codes + tile * (p.in / 4) * 64;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < xblocks; ++k) {
    __m256i sums[R][2];
    for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
    for (int64_t s = 0; s < steps; ++s, c += 64) {
      const int64_t b = k * steps + s;
      const __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)), flip);
      const __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32)), flip);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(p.xq + (m0 + r) * p.in)[b]);
        const __m256i ax = _mm256_sign_epi8(x, x);  // |x^|
        sums[r][0] = _mm256_add_epi32(sums[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(q0, x)), ones));
        sums[r][1] = _mm256_add_epi32(sums[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(q1, x)), ones));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 d = _mm256_set1_ps(p.xd[(m0 + r) * xblocks + k]);
      for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), d, acc[r][h]);
    }
  }
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(p.pairs) + tile * kTile;
  for (int h = 0; h < 2; ++h) {
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 8 * h))), 16));
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (m0 + r) * p.out + tile * kTile + 8 * h, _mm256_mul_ps(acc[r][h], scale));
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

// One code block of activations (groups not a multiple of 32): q in the block's column order; returns sum(q).
int32_t quantize_block(const uint16_t* x, int8_t* q, float& scale, const ColumnOrder& order) {
  const int64_t width = order.width;
  float amax = 0.0f;
  for (int64_t j = 0; j < width; ++j) amax = std::max(amax, std::fabs(bf16_to_float(x[j])));
  scale = amax / 127.0f;
  const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
  int32_t sum = 0;
  for (int64_t j = 0; j < width; ++j) {
    q[j] = static_cast<int8_t>(std::nearbyint(bf16_to_float(x[order.columns[j]]) * inverse));
    sum += q[j];
  }
  return sum;
}

// 32 activations at once: converted, scaled, rounded to nearest even (as std::nearbyint), packed to bytes in column
// order and shuffled into the code blocks' order; returns sum(q).
__attribute__((target("avx2,fma"))) int32_t quantize_32(const uint16_t* x, int8_t* q, float& scale, const ColumnOrder& order) {
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 8 * i))), 16));
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  scale = _mm_cvtss_f32(m4) / 127.0f;
  const __m256 inverse = _mm256_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // rounds to nearest even
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // columns 0 .. 31
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_shuffle_epi8(ordered, _mm256_load_si256(reinterpret_cast<const __m256i*>(order.shuffle))));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

// The activations as a path multiplies them: on AVX512 the bf16 rows and their sums per group; on AVX2 the rows quantized
// to int8 per block of `block` columns (d = max|x| / 127, q = round(x / d), as llama.cpp's Q8_0), stored in the codes'
// column order, and the sums of x^ = q d per group.
struct Activations {
  std::vector<int8_t> q;     // [rows, in]
  std::vector<float> scale;  // [rows, in / block]
  std::vector<float> sums;   // [rows, in / group]
  int64_t block = 0;
};

// block: 32 columns where the group allows, else one code block
__attribute__((target("avx2,fma"))) Activations activations(const at::Tensor& x, int64_t group, const ColumnOrder& order) {
  const int64_t rows = x.size(0), in = x.size(1), width = order.width;
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  Activations a;
  a.sums.assign(rows * (in / group), 0.0f);
  if (kAvx512) {
    for (int64_t i = 0; i < rows * (in / group); ++i)
      for (int64_t k = 0; k < group; ++k) a.sums[i] += bf16_to_float(xb[i * group + k]);
    return a;
  }
  a.block = group % 32 == 0 ? 32 : width;
  a.q.resize(rows * in);
  a.scale.resize(rows * (in / a.block));
  const int64_t blocks = in / a.block;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t first = m * in + k * a.block;
      float& scale = a.scale[m * blocks + k];
      const int32_t sum = a.block == 32 ? quantize_32(xb + first, a.q.data() + first, scale, order) : quantize_block(xb + first, a.q.data() + first, scale, order);
      a.sums[m * (in / group) + k * a.block / group] += static_cast<float>(sum) * scale;
    }
  return a;
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
  const Activations a = activations(x, group, kInt4Order);
  const Problem p{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(scale_zeros.data_ptr()), reinterpret_cast<const uint16_t*>(x.data_ptr()),
                  a.q.data(), a.scale.data(), a.sums.data(), y.data_ptr<float>(), rows, in, out, group, a.block};
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
  const Activations a = activations(x, group, kInt4Order);
  // a slot pool's fields are views into one buffer per slot: slots are stride(0) apart, each slot's field contiguous
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale_zeros.data_ptr());
  const int64_t row = x.size(0) == 1 ? 0 : 1, code_stride = codes.stride(0), pair_stride = scale_zeros.stride(0);
  const int64_t xblocks = a.block == 0 ? 0 : in / a.block;
  at::parallel_for(0, n * tiles, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / tiles, s = slot[i];
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(sp + s * pair_stride);
      const Problem p{cp + s * code_stride, pairs, xb + i * row * in, a.q.data() + (a.q.empty() ? 0 : i * row * in), a.scale.data() + i * row * xblocks,
                      a.sums.data() + i * row * groups, y.data_ptr<float>() + i * out, 1, in, out, group, a.block};
      tile_int4_any(p, item % tiles);
    }
  });
  return y;
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
  const Activations a = activations(x, x.size(1), kInt8Order);
  const Problem p{codes.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(scales.data_ptr()), reinterpret_cast<const uint16_t*>(x.data_ptr()),
                  a.q.data(), a.scale.data(), a.sums.data(), y.data_ptr<float>(), x.size(0), x.size(1), out, x.size(1), a.block};
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
  const Activations a = activations(x, in, kInt8Order);
  const int64_t xblocks = a.block == 0 ? 0 : in / a.block;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const int64_t row = x.size(0) == 1 ? 0 : 1;
  at::parallel_for(0, n * tiles, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / tiles, s = slot[i];
      const uint32_t* scale = reinterpret_cast<const uint32_t*>(sp + s * scales.stride(0));  // read as 16-bit values
      const Problem p{cp + s * codes.stride(0), scale, xb + i * row * in, a.q.data() + (a.q.empty() ? 0 : i * row * in), a.scale.data() + i * row * xblocks,
                      a.sums.data() + i * row, y.data_ptr<float>() + i * out, 1, in, out, in, a.block};
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
