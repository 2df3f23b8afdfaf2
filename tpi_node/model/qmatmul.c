/* y = x @ W.T for W stored in GGUF block formats, activations in fp32.
 *
 * W is [N rows][nb blocks] of 32 weights each, row-major, blocks exactly as llama.cpp writes them:
 *   Q4_0 (18 bytes): f16 d, 16 bytes of nibbles            w = d * (q - 8)
 *   Q4_1 (20 bytes): f16 d, f16 m, 16 bytes of nibbles     w = d * q + m
 *   Q8_0 (34 bytes): f16 d, 32 int8                        w = d * q
 *   Q5_0 (22 bytes): f16 d, u32 high bits, 16 bytes of nibbles         w = d * (q - 16)
 *   Q5_1 (24 bytes): f16 d, f16 m, u32 high bits, 16 bytes of nibbles  w = d * q + m
 *     (weight j's fifth bit is bit j of the little-endian word)
 * or a K-quant's 32-weight sub-block, repacked from its 256-weight super-block (weights/repack.py):
 *   Q4_K (23 bytes): f16 d, f16 dmin, u8 sc, u8 mn, 0, 16 bytes of nibbles   w = (d sc) q - dmin mn
 *   Q6_K (36 bytes): f16 d, i8 sc_lo, i8 sc_hi, 32 int8 (q - 32)          w = (d sc_half) q
 *     (sc_lo scales weights 0..15, sc_hi 16..31: a Q6_K scale covers 16 weights)
 * or, for a fused matrix whose parts come in different formats (model/quant.py's as_mixed), any
 * of them exactly in one:
 *   Q8_MIX (40 bytes): f16 d, f16 dmin, i8 sc_lo, i8 sc_hi, u8 mn, 0, 32 int8  w = (d sc_half) q - dmin mn
 * Nibbles: byte j holds weight j (low 4 bits) and weight j + 16 (high 4 bits).
 * x is [T][K] fp32 (K = 32 nb), y is [T][N] fp32. Every product is the exact dequantised weight
 * times x, accumulated in fp32: the result equals x @ dequantise(W).T up to summation order.
 *
 * Built with gcc -O3 -march=native for the CPU it runs on: AVX-512 intrinsics where the CPU has
 * them, AVX2 + FMA intrinsics where it has those, else plain C that gcc vectorises (NEON, ...);
 * rows are split across a small pool of worker threads of its own (see `run_parts`).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QK 32
/* Software prefetch this many bytes ahead of the block being read. A decode step's weights come
 * from DRAM (the model does not stay in cache between tokens), and one core's hardware prefetch
 * keeps too few lines in flight. Reading 1.1 MiB of q4_1 cold on 2 threads (2-core Xeon VM, the
 * copies of scripts/bench_quant_kernels.py), none / 1 / 2 / 4 KiB ahead: exact 158 / 104 / 106 /
 * 115 us, int8 activations 127 / 83 / 76 / 78 us. */
#define PF_DIST 2048
#define TMAX 16 /* rows of x handled per pass over W (accumulators live on the stack) */

static inline float f16(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

enum { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_K = 3, Q6_K = 4, Q8_MIX = 5, Q5_0 = 6, Q5_1 = 7, KINDS = 8 };
static const int BLOCK_BYTES[] = {18, 20, 34, 23, 36, 40, 22, 24};
static const int QS_AT[] = {2, 4, 2, 7, 4, 8, 6, 8}; /* where a block's quants start */

/* Q5_0 / Q5_1: the fifth bits of the block's 32 weights (bit j: weight j), before the nibbles */
static inline int five_bits(int kind) { return kind == Q5_0 || kind == Q5_1; }
static inline uint32_t high_bits(int kind, const uint8_t *blk) {
    uint32_t h;
    memcpy(&h, blk + QS_AT[kind] - 4, 4);
    return h;
}

/* the bytes 0x10 / 0x00 of 8 weights from 8 fifth bits (bit i -> byte i): the AVX2 and plain C
 * paths OR them into the nibbles (AVX-512 has mask registers for it) */
static uint64_t BIT_BYTES[256];
__attribute__((constructor)) static void init_bit_bytes(void) {
    for (int v = 0; v < 256; v++)
        for (int i = 0; i < 8; i++)
            if (v >> i & 1) BIT_BYTES[v] |= (uint64_t)0x10 << (8 * i);
}

/* int8 quants with a scale per half block (weights 0..15, 16..31), applied to the weights */
static inline int halves(int kind) { return kind == Q6_K || kind == Q8_MIX; }
static inline float half_scale(int kind, const uint8_t *blk, int half) { /* d sc: exact in fp32 */
    return f16(blk) * (float)(int8_t)blk[(kind == Q6_K ? 2 : 4) + half];
}

/* the scale of a block's sum of q x: its d (a Q4_K sub-block: d sc, exact in fp32 as gguf-py
 * computes it); 1 where the half scales are applied to the weights (block_q) */
static inline float blk_d(int kind, const uint8_t *blk) {
    return kind == Q4_K ? f16(blk) * (float)blk[4] : halves(kind) ? 1.0f : f16(blk);
}

/* the m of w = d q + m, which multiplies the block's sum of x; Q8_0 and Q6_K have none */
static inline int has_m(int kind) { return kind != Q8_0 && kind != Q6_K; }
static inline float blk_m(int kind, const uint8_t *blk) {
    if (kind == Q4_K || kind == Q8_MIX) return -(f16(blk + 2) * (float)blk[kind == Q4_K ? 5 : 6]);
    if (kind == Q5_0) return -16.0f * f16(blk);                  /* d (q - 16) = d q - 16 d */
    return kind == Q4_1 || kind == Q5_1 ? f16(blk + 2) : -8.0f * f16(blk); /* Q4_0: d (q - 8) */
}

/* one block's 32 quants as floats (Q6_K's and Q8_MIX's with their half scales applied), with the
 * d and m of w = d q + m */
static inline void unpack(int kind, const uint8_t *blk, float *restrict q, float *d, float *m) {
    *d = blk_d(kind, blk);
    *m = 0.0f;
    if (kind == Q8_0 || halves(kind)) {
        const int8_t *qs = (const int8_t *)(blk + QS_AT[kind]);
        for (int j = 0; j < QK; j++) q[j] = (float)qs[j];
        if (halves(kind))
            for (int j = 0; j < QK; j++) q[j] *= half_scale(kind, blk, j >= QK / 2);
        if (has_m(kind)) *m = blk_m(kind, blk);
        return;
    }
    const uint8_t *qs = blk + QS_AT[kind];
    *m = blk_m(kind, blk);
    const uint32_t h = five_bits(kind) ? high_bits(kind, blk) : 0;
    for (int j = 0; j < QK / 2; j++) {
        q[j] = (float)((qs[j] & 15) | (h >> j & 1) << 4);
        q[j + QK / 2] = (float)((qs[j] >> 4) | (h >> (j + 16) & 1) << 4);
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* AVX-512: one block is two vectors of 16 weights. For q4: the 16 nibble bytes widen once to 16
 * int32 lanes (lane j holds byte j); its low nibble is weight j, its high nibble weight j + 16.
 * Per row of x: dot = lo * x[0:16] + hi * x[16:32], then acc += d * dot (the scale applied once).
 * The m (or -8 d) term needs the block's sum of x: one scalar multiply-add per block. */
static inline void block_q(int kind, const uint8_t *blk, __m512 *lo, __m512 *hi) {
    if (kind == Q8_0 || halves(kind)) {
        const uint8_t *qs = blk + QS_AT[kind];
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qs)));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16))));
        if (halves(kind)) { /* the weights themselves: q (d sc), rounded once as gguf-py does */
            *lo = _mm512_mul_ps(*lo, _mm512_set1_ps(half_scale(kind, blk, 0)));
            *hi = _mm512_mul_ps(*hi, _mm512_set1_ps(half_scale(kind, blk, 1)));
        }
        return;
    }
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + QS_AT[kind])));
    __m512i l = _mm512_and_si512(b, _mm512_set1_epi32(15)), h = _mm512_srli_epi32(b, 4);
    if (five_bits(kind)) { /* 16 in the lanes whose fifth bit is set */
        const uint32_t bits = high_bits(kind, blk);
        l = _mm512_or_si512(l, _mm512_maskz_set1_epi32((__mmask16)(bits & 0xFFFF), 16));
        h = _mm512_or_si512(h, _mm512_maskz_set1_epi32((__mmask16)(bits >> 16), 16));
    }
    *lo = _mm512_cvtepi32_ps(l);
    *hi = _mm512_cvtepi32_ps(h);
}

#define TV 4 /* rows of x per pass: their accumulators stay in registers */
/* one row of W against one row of x (the decode step's case): two accumulator chains in registers
 * (in the TV-row loop below they live in a stack array, and every fmadd waited for the last one's
 * store: SmolLM2's gate|up, warm, one thread, 180 -> 150 us) */
static inline __attribute__((always_inline)) float row_dot(int kind, const float *x, const float *xsum, int64_t nb,
                                                           const uint8_t *row) {
    const int64_t bb = BLOCK_BYTES[kind];
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float am0 = 0.0f, am1 = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        if (b % 2 == 0) __builtin_prefetch(blk + PF_DIST);
        __m512 lo, hi;
        block_q(kind, blk, &lo, &hi);
        const float d = blk_d(kind, blk);
        __m512 dot = _mm512_mul_ps(lo, _mm512_loadu_ps(x + b * QK));
        dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + b * QK + 16), dot);
        const float m = has_m(kind) ? blk_m(kind, blk) * xsum[b] : 0.0f;
        if (b & 1) {
            acc1 = _mm512_fmadd_ps(dot, _mm512_set1_ps(d), acc1);
            am1 += m;
        } else {
            acc0 = _mm512_fmadd_ps(dot, _mm512_set1_ps(d), acc0);
            am0 += m;
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + am0 + am1;
}

/* one row of W against tn (<= TV) rows of x, each output y[t * N]. Inlined with a constant tn,
 * so that gcc unrolls the t loops and keeps acc[] in registers (a variable tn left them on the
 * stack: every fmadd waited for the last one's store) */
static inline __attribute__((always_inline)) void rows_tn(int kind, const float *x, const float *xsum, int64_t K,
                                                          int64_t nb, const uint8_t *row, float *y, int64_t N,
                                                          const int tn) {
    const int64_t bb = BLOCK_BYTES[kind];
    __m512 acc[TV] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float accm[TV] = {0, 0, 0, 0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        __m512 lo, hi;
        block_q(kind, blk, &lo, &hi);
        const float d = blk_d(kind, blk);
        const float m = has_m(kind) ? blk_m(kind, blk) : 0.0f;
        const __m512 vd = _mm512_set1_ps(d);
        for (int t = 0; t < tn; t++) {
            const float *xb = x + t * K + b * QK;
            __m512 dot = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
            dot = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), dot);
            acc[t] = _mm512_fmadd_ps(dot, vd, acc[t]);
            if (xsum) accm[t] += m * xsum[t * nb + b];
        }
    }
    for (int t = 0; t < tn; t++) y[t * N] = _mm512_reduce_add_ps(acc[t]) + accm[t];
}
#define SIMD_ROWS 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* AVX2 + FMA (most x86 laptops and desktops without AVX-512): the AVX-512 code's scheme with
 * 8-lane vectors, one block being four of them. Before it, such machines ran the portable loops
 * below, which decoded SmolLM2's Q4_1 at 20 tok/s on the EPYC VM built for x86-64-v3: slower than
 * fp32. q[0..1] are weights 0..15 (a q4's low nibbles), q[2..3] weights 16..31. */
static inline void block_q(int kind, const uint8_t *blk, __m256 q[4]) {
    if (kind == Q8_0 || halves(kind)) {
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + QS_AT[kind] + 8 * i))));
        if (halves(kind))
            for (int i = 0; i < 4; i++) q[i] = _mm256_mul_ps(q[i], _mm256_set1_ps(half_scale(kind, blk, i / 2)));
        return;
    }
    const __m128i b = _mm_loadu_si128((const __m128i *)(blk + QS_AT[kind]));
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
    if (five_bits(kind)) {
        const uint32_t h = high_bits(kind, blk);
        lo = _mm_or_si128(lo, _mm_set_epi64x((long long)BIT_BYTES[h >> 8 & 255], (long long)BIT_BYTES[h & 255]));
        hi = _mm_or_si128(hi, _mm_set_epi64x((long long)BIT_BYTES[h >> 24], (long long)BIT_BYTES[h >> 16 & 255]));
    }
    q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* sum over the block's 32 weights of q * x (before the scale) */
static inline __m256 block_dot(const __m256 q[4], const float *xb) {
    __m256 dot = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
    dot = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), dot);
    dot = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), dot);
    return _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), dot);
}

#define TV 4
static inline __attribute__((always_inline)) float row_dot(int kind, const float *x, const float *xsum, int64_t nb,
                                                           const uint8_t *row) {
    const int64_t bb = BLOCK_BYTES[kind];
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float am = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        if (b % 2 == 0) __builtin_prefetch(blk + PF_DIST);
        __m256 q[4];
        block_q(kind, blk, q);
        const float d = blk_d(kind, blk);
        const __m256 dot = block_dot(q, x + b * QK);
        if (b & 1) acc1 = _mm256_fmadd_ps(dot, _mm256_set1_ps(d), acc1);
        else acc0 = _mm256_fmadd_ps(dot, _mm256_set1_ps(d), acc0);
        am += has_m(kind) ? blk_m(kind, blk) * xsum[b] : 0.0f;
    }
    return hsum8(_mm256_add_ps(acc0, acc1)) + am;
}

static inline __attribute__((always_inline)) void rows_tn(int kind, const float *x, const float *xsum, int64_t K,
                                                          int64_t nb, const uint8_t *row, float *y, int64_t N,
                                                          const int tn) {
    const int64_t bb = BLOCK_BYTES[kind];
    __m256 acc[TV] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float accm[TV] = {0, 0, 0, 0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        __m256 q[4];
        block_q(kind, blk, q);
        const float d = blk_d(kind, blk);
        const float m = has_m(kind) ? blk_m(kind, blk) : 0.0f;
        const __m256 vd = _mm256_set1_ps(d);
        for (int t = 0; t < tn; t++) {
            acc[t] = _mm256_fmadd_ps(block_dot(q, x + t * K + b * QK), vd, acc[t]);
            if (xsum) accm[t] += m * xsum[t * nb + b];
        }
    }
    for (int t = 0; t < tn; t++) y[t * N] = hsum8(acc[t]) + accm[t];
}
#define SIMD_ROWS 1
#endif

#ifdef SIMD_ROWS
static void rows_pass(int kind, const float *x, const float *xsum, int64_t K, const uint8_t *w, int64_t N,
                      float *y, int64_t n0, int64_t n1, int64_t t0, int nt) {
    const int64_t nb = K / QK, bb = BLOCK_BYTES[kind], rs = nb * bb;
    if (nt == 1) { /* decode: one loop per format, its per-block format tests folded away */
        const float *x1 = x + t0 * K, *s1 = xsum ? xsum + t0 * nb : NULL;
        float *y1 = y + t0 * N;
#define ROWS1(KIND) \
    for (int64_t n = n0; n < n1; n++) y1[n] = row_dot(KIND, x1, s1, nb, w + n * rs);
        switch (kind) {
        case Q4_0: ROWS1(Q4_0) break;
        case Q4_1: ROWS1(Q4_1) break;
        case Q8_0: ROWS1(Q8_0) break;
        case Q4_K: ROWS1(Q4_K) break;
        case Q6_K: ROWS1(Q6_K) break;
        case Q5_0: ROWS1(Q5_0) break;
        case Q5_1: ROWS1(Q5_1) break;
        default: ROWS1(Q8_MIX)
        }
#undef ROWS1
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * rs;
        __builtin_prefetch(row + PF_DIST);
        for (int ta = 0; ta < nt; ta += TV) {
            float *yt = y + (t0 + ta) * N + n;
            const float *xr = x + (t0 + ta) * K, *sr = xsum ? xsum + (t0 + ta) * nb : NULL;
            switch (nt - ta < TV ? nt - ta : TV) { /* a constant tn each: accumulators in registers */
            case 1: rows_tn(kind, xr, sr, K, nb, row, yt, N, 1); break;
            case 2: rows_tn(kind, xr, sr, K, nb, row, yt, N, 2); break;
            case 3: rows_tn(kind, xr, sr, K, nb, row, yt, N, 3); break;
            default: rows_tn(kind, xr, sr, K, nb, row, yt, N, 4);
            }
        }
    }
}
#else
/* portable (NEON and the rest): gcc vectorises the loops over the 32 weights of a block */
static void rows_pass(int kind, const float *x, const float *xsum, int64_t K, const uint8_t *w, int64_t N,
                      float *y, int64_t n0, int64_t n1, int64_t t0, int nt) {
    const int64_t nb = K / QK, bb = BLOCK_BYTES[kind], rs = nb * bb;
    float q[QK] __attribute__((aligned(64)));
    float acc[TMAX][QK] __attribute__((aligned(64)));
    float accm[TMAX];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * rs;
        memset(acc, 0, sizeof(acc[0]) * nt); /* the rows of x in use: one in decode, not TMAX */
        memset(accm, 0, sizeof(accm[0]) * nt);
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            unpack(kind, row + b * bb, q, &d, &m);
            for (int j = 0; j < QK; j++) q[j] *= d;
            for (int t = 0; t < nt; t++) {
                const float *xb = x + (t0 + t) * K + b * QK;
                for (int j = 0; j < QK; j++) acc[t][j] += q[j] * xb[j];
                if (xsum) accm[t] += m * xsum[(t0 + t) * nb + b];
            }
        }
        for (int t = 0; t < nt; t++) {
            float s = accm[t];
            for (int j = 0; j < QK; j++) s += acc[t][j];
            y[(t0 + t) * N + n] = s;
        }
    }
}
#endif

/* ---- int8 activations (opt-in: --act-quant int8) ------------------------------------------------
 * llama.cpp's way: each 32-value block of x is rounded to int8 with one fp32 scale (x ~ xd * xq,
 * xd = max|x| / 127), and a block's product is one integer dot product (AVX512-VNNI vpdpbusd: 64
 * u8 x s8 products per instruction), scaled once: sum_j w_j x_j ~ dw * xd * sum_j q_j xq_j (+ m *
 * the block's exact fp32 sum of x for Q4_1 / Q4_0). A one-token row of SmolLM2's gate|up, warm, one
 * thread: 86 us against the exact kernel's 150.
 * The weights are still exact; the rounding of x (<= xd / 2 per value) is what moves the logits.
 * vpdpbusd multiplies unsigned by signed bytes: nibbles are 0..15 already; a Q8_0 weight q is fed
 * as q + 128 (q ^ 0x80), and 128 * sum(xq) is taken back through the accumulator's start value. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_Q8DOT 1

struct xq8 {        /* x [T][K] quantised for the integer kernel */
    int8_t *q;      /* [T][K] */
    float *s;       /* [T][nb]: the exact fp32 sum of each block (the m term) */
    float *dd;      /* [T][npair][16]: a pair of blocks' scales, each in its 8 lanes of the dot */
    int32_t *corr;  /* [T][npair][16]: -16 * sum(xq) of a block in each of its 8 lanes (Q8_0 offset) */
};

static void quantise_x(const float *x, int64_t T, int64_t K, struct xq8 *o) {
    const int64_t nb = K / QK, np = (nb + 1) / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + t * K + b * QK;
            const __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
            const float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
            const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
            const __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
            _mm_storeu_si128((__m128i *)(o->q + t * K + b * QK), _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(o->q + t * K + b * QK + 16), _mm512_cvtsepi32_epi8(qc));
            o->s[t * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
            const int32_t sq = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
            float *dd = o->dd + (t * np + b / 2) * 16 + (b % 2) * 8;
            int32_t *corr = o->corr + (t * np + b / 2) * 16 + (b % 2) * 8;
            for (int l = 0; l < 8; l++) dd[l] = d, corr[l] = -16 * sq;
            if (b == nb - 1 && b % 2 == 0)
                for (int l = 8; l < 16; l++) dd[l] = 0.0f, corr[l] = 0; /* the odd last block's empty half */
        }
}

/* two blocks' 64 weights as unsigned bytes, in x's order: block b's 32, then block b + 1's */
static inline __m512i pair_u8(int kind, const uint8_t *b0, const uint8_t *b1) {
    if (kind == Q8_0) {
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                             _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
        return _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
    }
    const int off = QS_AT[kind];
    /* 128-bit lanes [q0 q0 q1 q1]; lanes 1 and 3 take the high nibbles (weights 16..31) */
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(b0 + off)));
    v = _mm512_mask_broadcast_i32x4(v, 0xFF00, _mm_loadu_si128((const __m128i *)(b1 + off)));
    v = _mm512_mask_blend_epi64(0xCC, v, _mm512_srli_epi16(v, 4));
    v = _mm512_and_si512(v, _mm512_set1_epi8(15));
    if (five_bits(kind)) /* byte i of the pair: bit i of b0's word, then of b1's */
        v = _mm512_or_si512(v, _mm512_maskz_set1_epi8(high_bits(kind, b0) | (uint64_t)high_bits(kind, b1) << 32, 16));
    return v;
}

/* one row of W against one row of x: the decode step's case, its accumulators in registers (two
 * chains, so that an fmadd need not wait for the previous one) */
static inline __attribute__((always_inline)) float row_dot_q8(int kind, const struct xq8 *xq, int64_t t, int64_t K,
                                                              const uint8_t *row) {
    const int64_t nb = K / QK, np = (nb + 1) / 2, bb = BLOCK_BYTES[kind];
    const int8_t *xr = xq->q + t * K;
    const float *dd = xq->dd + t * np * 16, *xs = xq->s + t * nb;
    const int32_t *corr = xq->corr + t * np * 16;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    float am0 = 0.0f, am1 = 0.0f;
    int64_t p = 0;
    for (; 2 * p + 1 < nb; p++) { /* whole pairs */
        const uint8_t *b0 = row + 2 * p * bb, *b1 = b0 + bb;
        __builtin_prefetch(b0 + PF_DIST);
        const __m512i wv = pair_u8(kind, b0, b1);
        const float d0 = blk_d(kind, b0), d1 = blk_d(kind, b1);
        const __m512 vd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
        const __m512i start = kind == Q8_0 ? _mm512_loadu_si512(corr + p * 16) : _mm512_setzero_si512();
        const __m512i dot = _mm512_dpbusd_epi32(start, wv, _mm512_loadu_si512(xr + 2 * p * QK));
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(vd, _mm512_loadu_ps(dd + p * 16)));
        if (p & 1) acc1 = _mm512_add_ps(acc1, v); else acc0 = _mm512_add_ps(acc0, v);
        if (kind != Q8_0) { /* the m term (Q6_K and Q8_MIX never come here) */
            am0 += blk_m(kind, b0) * xs[2 * p];
            am1 += blk_m(kind, b1) * xs[2 * p + 1];
        }
    }
    if (2 * p < nb) { /* an odd last block: the pair's second half is zero in x and its scales */
        const uint8_t *b0 = row + 2 * p * bb;
        const __m512i wv = pair_u8(kind, b0, b0);
        const __m512i start = kind == Q8_0 ? _mm512_loadu_si512(corr + p * 16) : _mm512_setzero_si512();
        const __m512i xv = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xr + 2 * p * QK)));
        const __m512i dot = _mm512_dpbusd_epi32(start, wv, _mm512_zextsi256_si512(_mm512_castsi512_si256(xv)));
        const float d0 = blk_d(kind, b0);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(d0), _mm512_loadu_ps(dd + p * 16)), acc0);
        if (kind != Q8_0) am0 += blk_m(kind, b0) * xs[2 * p];
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + am0 + am1;
}

/* one row of W against tn (<= TV) rows of x from row t1 of xq (constant tn: see rows_tn) */
static inline __attribute__((always_inline)) void rows_tn_q8(int kind, const struct xq8 *xq, int64_t t1, int64_t K,
                                                             const uint8_t *row, float *y, int64_t N, const int tn) {
    const int64_t nb = K / QK, np = (nb + 1) / 2, bb = BLOCK_BYTES[kind];
    __m512 acc[TV] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    float accm[TV] = {0, 0, 0, 0};
    for (int64_t p = 0; p < np; p++) {
        const int64_t b = 2 * p;
        const int odd_end = b + 1 == nb; /* the last block alone: its pair's second half is zero in x's scales */
        const uint8_t *b0 = row + b * bb, *b1 = odd_end ? b0 : b0 + bb;
        const __m512i wv = pair_u8(kind, b0, b1);
        const float d0 = blk_d(kind, b0), d1 = blk_d(kind, b1);
        const __m512 vd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
        float m0 = 0.0f, m1 = 0.0f;
        if (kind != Q8_0) {
            m0 = blk_m(kind, b0);
            m1 = odd_end ? 0.0f : blk_m(kind, b1);
        }
        for (int t = 0; t < tn; t++) {
            const int64_t tt = t1 + t;
            const int8_t *xb = xq->q + tt * K + b * QK;
            const __m512i xv = odd_end ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)xb))
                                       : _mm512_loadu_si512(xb);
            const __m512i start =
                kind == Q8_0 ? _mm512_loadu_si512(xq->corr + (tt * np + p) * 16) : _mm512_setzero_si512();
            const __m512i dot = _mm512_dpbusd_epi32(start, wv, xv);
            const __m512 scale = _mm512_mul_ps(vd, _mm512_loadu_ps(xq->dd + (tt * np + p) * 16));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
            if (kind != Q8_0) accm[t] += m0 * xq->s[tt * nb + b] + (odd_end ? 0.0f : m1 * xq->s[tt * nb + b + 1]);
        }
    }
    for (int t = 0; t < tn; t++) y[t * N] = _mm512_reduce_add_ps(acc[t]) + accm[t];
}

static void rows_pass_q8(int kind, const struct xq8 *xq, int64_t K, const uint8_t *w, int64_t N, float *y,
                         int64_t n0, int64_t n1, int64_t t0, int nt) {
    const int64_t nb = K / QK, rs = nb * BLOCK_BYTES[kind];
    if (nt == 1) { /* as rows_pass: one loop per format (Q6_K and Q8_MIX never come here) */
#define ROWS1(KIND) \
    for (int64_t n = n0; n < n1; n++) y[t0 * N + n] = row_dot_q8(KIND, xq, t0, K, w + n * rs);
        switch (kind) {
        case Q4_0: ROWS1(Q4_0) break;
        case Q4_1: ROWS1(Q4_1) break;
        case Q4_K: ROWS1(Q4_K) break;
        case Q5_0: ROWS1(Q5_0) break;
        case Q5_1: ROWS1(Q5_1) break;
        default: ROWS1(Q8_0)
        }
#undef ROWS1
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * rs;
        __builtin_prefetch(row + PF_DIST);
        for (int ta = 0; ta < nt; ta += TV) {
            float *yt = y + (t0 + ta) * N + n;
            switch (nt - ta < TV ? nt - ta : TV) {
            case 1: rows_tn_q8(kind, xq, t0 + ta, K, row, yt, N, 1); break;
            case 2: rows_tn_q8(kind, xq, t0 + ta, K, row, yt, N, 2); break;
            case 3: rows_tn_q8(kind, xq, t0 + ta, K, row, yt, N, 3); break;
            default: rows_tn_q8(kind, xq, t0 + ta, K, row, yt, N, 4);
            }
        }
    }
}
#endif

/* ---- worker pool -----------------------------------------------------------------------------
 * Why not OpenMP: called from a thread that is not the process's first (the engine's step thread,
 * a worker's session loop), a libgomp parallel region cost ~70 us more than from the main thread
 * here, more than a decode step's matmul takes. These workers live as long as the process: after
 * a job they spin for SPIN_NS (by the clock: a `pause` takes ~10 to ~140 cycles depending on the
 * CPU), then sleep on a condition variable. The next matmul of a decode step comes after the
 * layer's small ops: waking a sleeping worker there costs ~30 us each way on a VM, so a spin of
 * ~40 us (4096 pauses here) decoded SmolLM2 at 42.9 tok/s and one of 0.3 ms at ~51 (1.2x; 1.2 ms
 * gained nothing more). One job at a time: a second caller meanwhile runs its job on its own thread. */
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif
#define MAX_WORKERS 63
#define SPIN_NS 300000L

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

typedef void (*part_fn)(void *arg, int part, int parts);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;          /* workers running (ids 1..started) */
    atomic_int gen;       /* bumped for every job */
    atomic_int pending;   /* workers that have not finished the current job */
    atomic_flag busy;     /* a job is in flight */
    part_fn fn;
    void *arg;
    int parts;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, ATOMIC_FLAG_INIT, NULL, NULL, 0};

static void *worker_main(void *p) {
    /* p: the worker's id in the low 8 bits, above them the job generation it was created in (it
     * takes part in that job: it may start only after the job was posted) */
    const int id = (int)((intptr_t)p & 0xff);
    int seen = (int)((intptr_t)p >> 8) - 1;
    for (;;) {
        int g, spins = 0;
        long until = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            if (++spins % 64 || (until ? now_ns() < until : (until = now_ns() + SPIN_NS) != 0)) {
                CPU_RELAX();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (id < pool.parts) pool.fn(pool.arg, id, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* fn(arg, p, parts) for p in 0..parts-1: part 0 on the calling thread, the rest on workers. */
static void run_parts(part_fn fn, void *arg, int parts) {
    if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
    if (parts <= 1 || atomic_flag_test_and_set(&pool.busy)) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    while (pool.started < parts - 1) {
        pthread_t t;
        const intptr_t arg = ((intptr_t)(atomic_load(&pool.gen) + 1) << 8) | (pool.started + 1);
        if (pthread_create(&t, NULL, worker_main, (void *)arg) != 0) break;
        pthread_detach(t);
        pool.started++;
    }
    if (parts > pool.started + 1) parts = pool.started + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.parts = parts;
    atomic_store(&pool.pending, pool.started);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, parts);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) CPU_RELAX();
    atomic_flag_clear(&pool.busy);
}

/* the pool for decode_ops.c (attention of a decode step) */
void tpi_run_parts(part_fn fn, void *arg, int parts) { run_parts(fn, arg, parts); }

static inline void share(int64_t total, int part, int parts, int64_t *a, int64_t *b) {
    *a = total * part / parts;
    *b = total * (part + 1) / parts;
}

struct mm_job {
    int kind;
    const float *x, *xsum;
    int64_t T, K, N;
    const uint8_t *w;
    float *y;
    const void *xq; /* a struct xq8 when the activations run as int8, else NULL */
};

static void mm_part(void *p, int part, int parts) {
    const struct mm_job *j = p;
    int64_t c0, c1;
    share((j->N + 15) / 16, part, parts, &c0, &c1); /* chunks of 16 rows */
    for (int64_t c = c0; c < c1; c++) {
        int64_t n0 = c * 16, n1 = n0 + 16 < j->N ? n0 + 16 : j->N;
        for (int64_t t0 = 0; t0 < j->T; t0 += TMAX) {
            int nt = j->T - t0 < TMAX ? (int)(j->T - t0) : TMAX;
#ifdef HAVE_Q8DOT
            if (j->xq) {
                rows_pass_q8(j->kind, j->xq, j->K, j->w, j->N, j->y, n0, n1, t0, nt);
                continue;
            }
#endif
            rows_pass(j->kind, j->x, j->xsum, j->K, j->w, j->N, j->y, n0, n1, t0, nt);
        }
    }
}

/* Returns 0, or -1 for a bad argument. */
int tpi_qmatmul(int kind, const float *x, int64_t T, int64_t K, const uint8_t *w, int64_t N, float *y,
                int threads) {
    if (kind < 0 || kind >= KINDS || K % QK || T < 1 || N < 1) return -1;
    const int64_t nb = K / QK;
    float *xsum = NULL;
    if (has_m(kind)) { /* sum of each x block, for the m term */
        xsum = malloc(sizeof(float) * T * nb);
        if (!xsum) return -1;
        for (int64_t i = 0; i < T * nb; i++) {
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += x[i * QK + j];
            xsum[i] = s;
        }
    }
    /* small matrices stay on one thread: waking the others costs more than they save */
    if (N * K < (1 << 16)) threads = 1;
    struct mm_job job = {kind, x, xsum, T, K, N, w, y, NULL};
    run_parts(mm_part, &job, threads);
    free(xsum);
    return 0;
}

/* 1 where this build has the int8-activation kernel (the CPU has AVX512-VNNI), else 0 */
int tpi_has_q8dot(void) {
#ifdef HAVE_Q8DOT
    return 1;
#else
    return 0;
#endif
}

/* tpi_qmatmul with x rounded to int8 per block of 32 (see "int8 activations" above). Returns 0,
 * -1 for a bad argument, -2 where this build has no such kernel. */
int tpi_qmatmul_q8(int kind, const float *x, int64_t T, int64_t K, const uint8_t *w, int64_t N, float *y,
                   int threads) {
#ifdef HAVE_Q8DOT
    if (kind < 0 || kind >= KINDS || K % QK || T < 1 || N < 1) return -1;
    /* two scales a block (Q6_K, Q8_MIX) do not fit the pairwise integer dot (one scale per 8 lanes): exact */
    if (halves(kind)) return tpi_qmatmul(kind, x, T, K, w, N, y, threads);
    const int64_t nb = K / QK, np = (nb + 1) / 2;
    struct xq8 xq;
    /* one allocation: q (T K bytes, padded to 64), s, dd and corr */
    const size_t qb = ((size_t)(T * K) + 63) & ~(size_t)63;
    const size_t bytes = qb + sizeof(float) * T * nb + (sizeof(float) + sizeof(int32_t)) * T * np * 16;
    uint8_t *mem = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!mem) return -1;
    xq.q = (int8_t *)mem;
    xq.dd = (float *)(mem + qb);
    xq.corr = (int32_t *)(xq.dd + T * np * 16);
    xq.s = (float *)(xq.corr + T * np * 16);
    quantise_x(x, T, K, &xq);
    if (N * K < (1 << 16)) threads = 1;
    struct mm_job job = {kind, x, NULL, T, K, N, w, y, &xq};
    run_parts(mm_part, &job, threads);
    free(mem);
    return 0;
#else
    (void)kind, (void)x, (void)T, (void)K, (void)w, (void)N, (void)y, (void)threads;
    return -2;
#endif
}

struct dq_job {
    int kind;
    const uint8_t *w;
    int64_t K, n0, n1;
    float *out;
};

static void dq_part(void *p, int part, int parts) {
    const struct dq_job *j = p;
    const int64_t nb = j->K / QK, bb = BLOCK_BYTES[j->kind];
    int64_t a, b;
    share(j->n1 - j->n0, part, parts, &a, &b);
    for (int64_t n = j->n0 + a; n < j->n0 + b; n++) {
        for (int64_t blk = 0; blk < nb; blk++) {
            const uint8_t *w = j->w + (n * nb + blk) * bb;
            float *o = j->out + (n - j->n0) * j->K + blk * QK;
#if defined(__AVX512F__)
            /* q d + m, 16 at a time (q d is exact in fp32: an fp16 times a 4- or 8-bit integer) */
            __m512 lo, hi;
            block_q(j->kind, w, &lo, &hi);
            const float d = blk_d(j->kind, w), m = has_m(j->kind) ? blk_m(j->kind, w) : 0.0f;
            _mm512_storeu_ps(o, _mm512_fmadd_ps(lo, _mm512_set1_ps(d), _mm512_set1_ps(m)));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(hi, _mm512_set1_ps(d), _mm512_set1_ps(m)));
#elif defined(__AVX2__) && defined(__FMA__)
            __m256 q[4];
            block_q(j->kind, w, q);
            const float d = blk_d(j->kind, w), m = has_m(j->kind) ? blk_m(j->kind, w) : 0.0f;
            for (int i = 0; i < 4; i++)
                _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(q[i], _mm256_set1_ps(d), _mm256_set1_ps(m)));
#else
            float q[QK], d, m;
            unpack(j->kind, w, q, &d, &m);
            for (int k = 0; k < QK; k++) o[k] = q[k] * d + m;
#endif
        }
    }
}

/* W's rows [n0, n1) as fp32 into out ([n1 - n0][K]): for big steps (dequantise once, then one
 * GEMM) and for embedding lookups. */
int tpi_dequant(int kind, const uint8_t *w, int64_t K, int64_t n0, int64_t n1, float *out, int threads) {
    if (kind < 0 || kind >= KINDS || K % QK || n1 < n0) return -1;
    if ((n1 - n0) * K < (1 << 16)) threads = 1;
    struct dq_job job = {kind, w, K, n0, n1, out};
    run_parts(dq_part, &job, threads);
    return 0;
}
