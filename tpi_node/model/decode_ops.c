/* The small ops of a decode step on a CPU node in fp32, each one call instead of ten torch ops.
 *
 * A one-token step spends about as long in the dispatch of its small torch ops (rope, the KV
 * write, attention over a few hundred keys, add + RMSNorm: ~50 ops a layer, a few us each) as in
 * its matmuls; these do the same arithmetic in one pass each. Compiled with qmatmul.c into one
 * library (model/qkernel.py); called through model/decode_ops.py from model/layers.py (and, for
 * one node's whole decode loop, engine/runner.py) where the tensors are fp32 on the CPU, else the
 * torch ops run. Shapes as model/layers.py names them:
 * T tokens, H hidden, nq / nkv heads held here, hd head dim; KV pools are [slots][nkv][hd].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* qmatmul.c: y [T][N] = x [T][K] @ W.T for W in GGUF blocks (exact, or with int8 activations) */
int tpi_qmatmul(int kind, const float *x, int64_t T, int64_t K, const uint8_t *w, int64_t N, float *y, int threads);
int tpi_qmatmul_q8(int kind, const float *x, int64_t T, int64_t K, const uint8_t *w, int64_t N, float *y,
                   int threads);

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef void (*part_fn)(void *arg, int part, int parts);
void tpi_run_parts(part_fn fn, void *arg, int parts); /* qmatmul.c's worker pool */

/* sum of a[i] b[i] (or of a[i]^2 when b == a). Without -ffast-math gcc keeps one running sum in
 * order, a chain of scalar adds, so the lanes are explicit: AVX-512 registers and one horizontal
 * add where the CPU has them, else 16 independent lanes that gcc vectorises. */
static inline float dot(const float *a, const float *b, int64_t n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float lane[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += lane[j];
    return s;
#endif
}

/* x = res + delta, h = w * x / sqrt(mean(x^2) + eps), rows of H */
void tpi_add_rmsnorm(const float *res, const float *delta, const float *w, int64_t T, int64_t H, float eps,
                     float *x, float *h) {
    for (int64_t t = 0; t < T; t++) {
        const float *r = res + t * H, *d = delta + t * H;
        float *xr = x + t * H, *hr = h + t * H;
        for (int64_t i = 0; i < H; i++) xr[i] = r[i] + d[i];
        const float inv = 1.0f / sqrtf(dot(xr, xr, H) / (float)H + eps);
        for (int64_t i = 0; i < H; i++) hr[i] = w[i] * (xr[i] * inv);
    }
}

/* rotate-half rope of one head in place: x[i] cos[i] - x[i + hd/2] sin[i], and the other half */
static inline void rope_head(float *x, const float *cos, const float *sin, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* qkv [T][(nq + 2 nkv) hd] (q, k, v heads side by side): rope on q and k in place, then k and v
 * into the pools at slots[t]. cos / sin [T][hd]. */
void tpi_rope_store(float *qkv, int64_t T, int64_t nq, int64_t nkv, int64_t hd, const float *cos, const float *sin,
                    float *kpool, float *vpool, const int64_t *slots) {
    const int64_t stride = (nq + 2 * nkv) * hd;
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * stride;
        for (int64_t j = 0; j < nq + nkv; j++) rope_head(row + j * hd, cos + t * hd, sin + t * hd, hd);
        memcpy(kpool + slots[t] * nkv * hd, row + nq * hd, sizeof(float) * nkv * hd);
        memcpy(vpool + slots[t] * nkv * hd, row + (nq + nkv) * hd, sizeof(float) * nkv * hd);
    }
}

/* ---- attention of one-token sequences -----------------------------------------------------
 * Sequence b's query heads are row rows[b] of q (row stride qstride, heads of hd side by side);
 * query head i reads KV head i / (nq / nkv). It attends to its lens[b] tokens at slots[b][0 ..
 * lens[b]) (slots is [B][L]); its output is row rows[b] of out (row stride ostride). The g = nq /
 * nkv query heads of a KV head go together, so each key and value is loaded once for all of them.
 *
 * Keys go by in tiles of ATT_TILE with an online softmax (a running max and sum per head, the
 * output rescaled when the max grows), so no [L] score row is kept. A (sequence, KV head) pair's
 * keys may be cut into chunks that run on the pool's threads; each chunk leaves its unnormalised
 * output, max and sum, and the chunks are merged at the end (flash-decoding's split). One thread
 * on 1,000 keys took ~65% of a SmolLM2 token before (a scalar horizontal add per key and head). */
#define ATT_TILE 16
#define ATT_MIN_CHUNK 64 /* keys: shorter chunks are not worth a thread's sync */

/* exp(x) of 16 lanes for x <= 0 (scores minus their max): 2^n exp(r), |r| <= ln2 / 2, Taylor to
 * r^7 (relative error ~1e-8, below fp32's ulp) */
#if defined(__AVX512F__)
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* p[0..n) = exp(p - mx), n <= ATT_TILE; returns their sum */
static inline float exp_tile(float *p, int n, float mx) {
#if defined(__AVX512F__)
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p), _mm512_set1_ps(mx)));
    _mm512_mask_storeu_ps(p, m, e);
    return _mm512_mask_reduce_add_ps(m, e);
#else
    float s = 0.0f;
    for (int t = 0; t < n; t++) s += (p[t] = expf(p[t] - mx));
    return s;
#endif
}

struct attn_job {
    const float *q;
    int64_t qstride;
    const int64_t *rows; /* NULL: sequence b is row b */
    int64_t B, nq, nkv, hd;
    const float *kpool, *vpool;
    const int64_t *slots, *lens;
    int64_t L;
    float scale;
    float *out;
    int64_t ostride;
    int64_t chunks; /* key ranges per (sequence, KV head) */
    float *part;    /* chunks > 1: [B][nkv][chunks][g][hd + 2], o unnormalised, then max and sum */
};

/* Keys [l0, l1) of sequence b's KV head kvh for its g query heads: o [g][hd] unnormalised, m and
 * s [g] the max score and the sum of exp(score - max). */
static void attend_keys(const struct attn_job *j, int64_t b, int64_t kvh, int64_t l0, int64_t l1, float *o,
                        float *m, float *s) {
    const int64_t g = j->nq / j->nkv, hd = j->hd, nkv = j->nkv;
    const float *qh = j->q + (j->rows ? j->rows[b] : b) * j->qstride + kvh * g * hd; /* g heads, side by side */
    const int64_t *sl = j->slots + b * j->L;
    float p[g][ATT_TILE];
    memset(o, 0, sizeof(float) * g * hd);
    for (int64_t i = 0; i < g; i++) m[i] = -INFINITY, s[i] = 0.0f;
    for (int64_t t0 = l0; t0 < l1; t0 += ATT_TILE) {
        const int n = (int)(l1 - t0 < ATT_TILE ? l1 - t0 : ATT_TILE);
        for (int t = 0; t < n; t++) {
            const float *k = j->kpool + (sl[t0 + t] * nkv + kvh) * hd;
            for (int64_t i = 0; i < g; i++) p[i][t] = dot(qh + i * hd, k, hd) * j->scale;
        }
        for (int64_t i = 0; i < g; i++) {
            float mx = m[i];
            for (int t = 0; t < n; t++) mx = p[i][t] > mx ? p[i][t] : mx;
            if (mx > m[i] && m[i] != -INFINITY) { /* the max grew: rescale what is summed so far */
                const float c = expf(m[i] - mx);
                s[i] *= c;
                for (int64_t e = 0; e < hd; e++) o[i * hd + e] *= c;
            }
            m[i] = mx;
            s[i] += exp_tile(p[i], n, mx);
        }
        for (int t = 0; t < n; t++) {
            const float *restrict v = j->vpool + (sl[t0 + t] * nkv + kvh) * hd;
            for (int64_t i = 0; i < g; i++) {
                float *restrict oi = o + i * hd;
                const float w = p[i][t];
                for (int64_t e = 0; e < hd; e++) oi[e] += w * v[e];
            }
        }
    }
}

/* items [B][nkv][chunks], split evenly between the parts */
static void attend_part(void *arg, int part, int parts) {
    const struct attn_job *j = arg;
    const int64_t g = j->nq / j->nkv, hd = j->hd, C = j->chunks, items = j->B * j->nkv * C;
    float o[g * hd], m[g], s[g];
    for (int64_t it = items * part / parts; it < items * (part + 1) / parts; it++) {
        const int64_t b = it / (j->nkv * C), kvh = it / C % j->nkv, c = it % C, n = j->lens[b];
        attend_keys(j, b, kvh, n * c / C, n * (c + 1) / C, o, m, s);
        if (C == 1) { /* the whole softmax: normalise into out */
            float *dst = j->out + (j->rows ? j->rows[b] : b) * j->ostride + kvh * g * hd;
            for (int64_t i = 0; i < g; i++)
                for (int64_t e = 0; e < hd; e++) dst[i * hd + e] = o[i * hd + e] / s[i];
        } else {
            float *dst = j->part + it * g * (hd + 2);
            for (int64_t i = 0; i < g; i++) {
                memcpy(dst + i * (hd + 2), o + i * hd, sizeof(float) * hd);
                dst[i * (hd + 2) + hd] = m[i], dst[i * (hd + 2) + hd + 1] = s[i];
            }
        }
    }
}

/* Returns 0, or -1 when scratch memory ran out. threads: the pool's threads to use. */
int tpi_attend_decode(const float *q, int64_t qstride, const int64_t *rows, int64_t B, int64_t nq, int64_t nkv,
                      int64_t hd, const float *kpool, const float *vpool, const int64_t *slots, int64_t L,
                      const int64_t *lens, float scale, int threads, float *out, int64_t ostride) {
    const int64_t g = nq / nkv;
    int64_t keys = 0, longest = 0;
    for (int64_t b = 0; b < B; b++) keys += lens[b], longest = lens[b] > longest ? lens[b] : longest;
    int parts = threads > 1 && keys * nkv >= 2 * ATT_MIN_CHUNK ? threads : 1;
    int64_t chunks = 1; /* cut pairs into chunks when there are too few pairs for the threads */
    while (B * nkv * chunks < 2 * parts && longest / (chunks + 1) >= ATT_MIN_CHUNK) chunks++;
    struct attn_job j = {q, qstride, rows, B, nq, nkv, hd, kpool, vpool, slots, lens, L, scale, out, ostride,
                         chunks, NULL};
    if (chunks > 1 && !(j.part = malloc(sizeof(float) * B * nkv * chunks * g * (hd + 2)))) return -1;
    tpi_run_parts(attend_part, &j, parts);
    if (chunks == 1) return 0;
    for (int64_t b = 0; b < B; b++) /* merge the chunks of each pair: rescale to the largest max */
        for (int64_t kvh = 0; kvh < nkv; kvh++)
            for (int64_t i = 0; i < g; i++) {
                const float *pc = j.part + (b * nkv + kvh) * chunks * g * (hd + 2) + i * (hd + 2);
                const int64_t step = g * (hd + 2); /* from one chunk to the next */
                float mx = -INFINITY, sum = 0.0f;
                for (int64_t c = 0; c < chunks; c++) mx = pc[c * step + hd] > mx ? pc[c * step + hd] : mx;
                float *dst = out + (rows ? rows[b] : b) * ostride + (kvh * g + i) * hd;
                memset(dst, 0, sizeof(float) * hd);
                for (int64_t c = 0; c < chunks; c++) {
                    const float *oc = pc + c * step;
                    if (oc[hd] == -INFINITY) continue; /* an empty chunk */
                    const float f = expf(oc[hd] - mx);
                    sum += f * oc[hd + 1];
                    for (int64_t e = 0; e < hd; e++) dst[e] += f * oc[e];
                }
                for (int64_t e = 0; e < hd; e++) dst[e] /= sum;
            }
    free(j.part);
    return 0;
}

/* ---- whole halves of a decode layer, for weights in GGUF blocks -------------------------------
 * A step whose every sequence decodes one token, on a node whose matrices are quantised: its
 * attention half (qkv matmul, bias, rope + KV write, attention, o_proj) and its FFN half (gate|up
 * matmul, silu(gate) * up, down_proj) are one call each, instead of a dozen Python-level calls.
 * The arithmetic is the unfused path's: the same kernels, the same ops above. Returns 0, or -1
 * when the kernel refused an argument or scratch memory ran out. out: [T][H], this node's partial. */

static int qmm(int q8, int kind, const float *x, int64_t T, int64_t K, const uint8_t *w, int64_t N, float *y,
               int threads) {
    return q8 ? tpi_qmatmul_q8(kind, x, T, K, w, N, y, threads) : tpi_qmatmul(kind, x, T, K, w, N, y, threads);
}

int tpi_attention_decode(const float *h, int64_t T, int64_t H, int kind_qkv, const uint8_t *wqkv, const float *bqkv,
                         int kind_o, const uint8_t *wo, int64_t nq, int64_t nkv, int64_t hd, const float *cos,
                         const float *sin, float *kpool, float *vpool, const int64_t *slots, const int64_t *dslots,
                         int64_t L, const int64_t *lens, float scale, int threads, int q8, float *out) {
    const int64_t width = (nq + 2 * nkv) * hd;
    float *qkv = malloc(sizeof(float) * (T * width + T * nq * hd));
    if (!qkv) return -1;
    float *att = qkv + T * width;
    int rc = qmm(q8, kind_qkv, h, T, H, wqkv, width, qkv, threads);
    if (rc == 0) {
        if (bqkv)
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = 0; i < width; i++) qkv[t * width + i] += bqkv[i];
        tpi_rope_store(qkv, T, nq, nkv, hd, cos, sin, kpool, vpool, slots);
        rc = tpi_attend_decode(qkv, width, NULL, T, nq, nkv, hd, kpool, vpool, dslots, L, lens, scale, threads, att,
                               nq * hd);
        if (rc == 0) rc = qmm(q8, kind_o, att, T, nq * hd, wo, H, out, threads);
    }
    free(qkv);
    return rc;
}

int tpi_mlp(const float *h, int64_t T, int64_t H, int kind13, const uint8_t *w13, int kind2, const uint8_t *w2,
            int64_t F, int threads, int q8, float *out) {
    float *gu = malloc(sizeof(float) * T * 3 * F); /* [T][2F] gate | up, then [T][F] silu(gate) * up */
    if (!gu) return -1;
    float *a = gu + T * 2 * F;
    int rc = qmm(q8, kind13, h, T, H, w13, 2 * F, gu, threads);
    if (rc == 0) {
        for (int64_t t = 0; t < T; t++) {
            const float *gate = gu + t * 2 * F, *up = gate + F;
            float *at = a + t * F;
            for (int64_t i = 0; i < F; i++) at[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        }
        rc = qmm(q8, kind2, a, T, F, w2, H, out, threads);
    }
    free(gu);
    return rc;
}

/* ---- the whole layer loop of a decode step, on a node that holds every layer ----------------
 * With one node the allreduce is the partial itself, so runner.py's loop is, per layer l: x += the
 * attention half of h, h = RMSNorm(x) by post[l]; x += the FFN half of h, h = RMSNorm(x) by next[l]
 * (the next layer's input norm, the final norm after the last). Here that loop is one call, the same
 * calls in the same order: the result is the loop's, bit for bit. Its Python version cost ~0.85 ms
 * of a SmolLM2 token (30 layers, a few calls and checks each). Per layer l, in arrays of n_layers:
 * the matrices' addresses and GGUF kinds (wqkv, wo, w13, w2), the qkv bias or 0, this layer's KV
 * pools, and the two norm weights. x, h: [T][H], updated in place. On a node of a cluster, `reduce`
 * (else NULL) turns each half's partial into the sum over the nodes, in place, before the add and
 * norm: the collective's allreduce, called back into Python (0, or nonzero to stop). Returns 0, -1
 * (scratch or a refused argument, as the halves), or what `reduce` returned. */
typedef int (*tpi_reduce_fn)(float *part, int64_t n);

int tpi_decode_layers(int64_t n_layers, const int64_t *wqkv, const int32_t *kqkv, const int64_t *bqkv,
                      const int64_t *wo, const int32_t *ko, const int64_t *w13, const int32_t *k13, const int64_t *w2,
                      const int32_t *k2, const int64_t *kpools, const int64_t *vpools, const int64_t *post,
                      const int64_t *next, int64_t T, int64_t H, int64_t nq, int64_t nkv, int64_t hd, int64_t F,
                      const float *cos, const float *sin, const int64_t *slots, const int64_t *dslots, int64_t L,
                      const int64_t *lens, float scale, float eps, int threads, int q8, float *x, float *h,
                      tpi_reduce_fn reduce) {
    float *part = malloc(sizeof(float) * T * H);
    if (!part) return -1;
    int rc = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        rc = tpi_attention_decode(h, T, H, kqkv[l], (const uint8_t *)wqkv[l], (const float *)bqkv[l], ko[l],
                                  (const uint8_t *)wo[l], nq, nkv, hd, cos, sin, (float *)kpools[l],
                                  (float *)vpools[l], slots, dslots, L, lens, scale, threads, q8, part);
        if (rc == 0 && reduce) rc = reduce(part, T * H);
        if (rc != 0) break;
        tpi_add_rmsnorm(x, part, (const float *)post[l], T, H, eps, x, h); /* in place: element by element */
        rc = tpi_mlp(h, T, H, k13[l], (const uint8_t *)w13[l], k2[l], (const uint8_t *)w2[l], F, threads, q8, part);
        if (rc == 0 && reduce) rc = reduce(part, T * H);
        if (rc != 0) break;
        tpi_add_rmsnorm(x, part, (const float *)next[l], T, H, eps, x, h);
    }
    free(part);
    return rc;
}
