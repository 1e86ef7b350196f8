// Implementation of attention_forward (attention_cpu.h), written once and compiled per ISA variant: portable
// (whatever the build flags give, SSE2 on plain x86-64) in csrc/cpu/attention_portable.cpp; on x86 AVX2+FMA+F16C in
// csrc/cpu/attention_avx2.cpp and AVX-512 in csrc/cpu/attention_avx512.cpp under `#pragma GCC target`; on aarch64
// NEON in csrc/cpu/attention_neon.cpp; chosen per call (isa.h). Each translation unit defines MK_IMPL_NS (its own
// namespace, so the copies never collide at link time) and MK_ISA_AVX2 (AVX2 and AVX-512 copies) / MK_ISA_AVX512
// (the AVX-512 copy) / MK_ISA_NEON (the NEON copy).
// This header only picks the pieces (malloc_kernels/attention_cpu/), by concern:
//   scalar.h            blocking constants, exact scalar conversions of every stored format
//   tiles_<isa>.h       float-tile primitives (decode rows, Q K^T, P V, exp) -- the same names in every ISA
//                       (tiles_avx512.h: 512-bit Q K^T and P V over the AVX2 rest; tiles_neon.h: 128-bit NEON);
//                       tiles_lanes.h: the Q K^T / P V templates over a lane trait that the SIMD builds share
//   no_codes.h          the decode-from-codes entry points of the builds without them (portable, NEON)
//   codes_avx2.h        decode-sized Q K^T / P V straight from packed codes (any D % 8 == 0)
//   lanes_avx2.h        vector widths of the code layout: D = 32 / 64 / 128 (Lanes128 / 256 / 256x2 or 512)
//   code_layout_avx2.h  the code layout of int8/int4/int2 rows (and + convert, no shuffles), templated on lanes
//   code_pairs_avx512.h AVX-512: the D = 64 one-row loops with two keys per 512-bit register
//   code_rows_avx512.h  AVX-512: the D = 64 several-row (GQA) loops, two keys per register, codes expanded once
//                       per group of up to four rows
//   from_codes_avx2.h   the cache segment of a chunk straight from the codes (CacheFromCodes)
//   row_tiles.h         register-tiled micro-kernels for chunks of many rows (query rows in vector lanes; the
//                       SIMD builds)
//   int8_query.h        opt-in approximate scores: int8 query x int8/int4/int2 key codes in integers (VNNI)
//   bias_rows.h         relative bias of a block of keys (shared by kernel.h and from_codes_avx2.h)
//   scratch.h           per-thread scratch;  kernel.h  the Kernel (segments, masks, bias, softmax / SiLU, stats)
//
// Algorithm per work item (user b, kv head, block of queries), FlashAttention-2 style (arXiv 2307.08691) on a CPU:
//   rows r = (query head of this kv head, query) -- all GQA heads share each K/V block, read and dequantized once;
//   for each key segment (cache, residual, request) and each block of KB keys:
//     dequantize the K block into an L1 tile (codes only for per-channel keys: the channel scale is folded into the
//     query, q'_d = q_d * s_d, and the zero point into one per-row offset <q, z>, so per element only the code
//     conversion remains -- KIVI's per-channel key layout made cheap);
//     S = Q K^T (+ log count, + relative bias, masks) -> online softmax (or SiLU weights) -> O += P V (V tile
//     dequantized the same way).
// Nothing larger than a KB x D tile is ever materialised; the [Lq, N] score matrix never exists.
#pragma once

#ifdef MK_ISA_AVX2
#include "malloc_kernels/attention_cpu/tiles_avx2.h"
#ifdef MK_ISA_AVX512
#include "malloc_kernels/attention_cpu/tiles_avx512.h"
#endif
#include "malloc_kernels/attention_cpu/codes_avx2.h"
#ifdef MK_ISA_AVX512
#include "malloc_kernels/attention_cpu/code_pairs_avx512.h"
#include "malloc_kernels/attention_cpu/code_rows_avx512.h"
#include "malloc_kernels/attention_cpu/tile_codes_avx512.h"
#endif
#include "malloc_kernels/attention_cpu/int8_query.h"
#include "malloc_kernels/attention_cpu/from_codes_avx2.h"
#include "malloc_kernels/attention_cpu/row_tiles.h"
#elif defined(MK_ISA_NEON)
#include "malloc_kernels/attention_cpu/tiles_neon.h"
#include "malloc_kernels/attention_cpu/int8_query.h"
#include "malloc_kernels/attention_cpu/row_tiles.h"
#else
#include "malloc_kernels/attention_cpu/tiles_portable.h"
#include "malloc_kernels/attention_cpu/int8_query.h"
#endif
#include "malloc_kernels/attention_cpu/kernel.h"
