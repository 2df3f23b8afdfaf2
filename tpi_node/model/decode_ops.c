/* The small ops of a decode step on a CPU node in fp32, each one call instead of ten torch ops.
 *
 * A one-token step spends about as long in the dispatch of its small torch ops (rope, the KV
 * write, attention over a few hundred keys, add + RMSNorm: ~50 ops a layer, a few us each) as in
 * its matmuls; these do the same arithmetic in one pass each. Compiled with qmatmul.c into one
 * library (model/qkernel.py); called from model/layers.py and comm/collective.py where the
 * tensors are fp32 on the CPU, else the torch ops run. Shapes as model/layers.py names them:
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

/* sum of a[i] b[i] (or of a[i]^2 when b == a) in 16 independent lanes: without -ffast-math gcc
 * may not reorder one running sum, so a plain loop would be a chain of scalar adds */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lane[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += lane[j];
    return s;
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

/* Attention of one-token sequences. Sequence b's query heads are row rows[b] of q (row stride
 * qstride, heads of hd side by side); query head i reads KV head i / (nq / nkv). It attends to its
 * lens[b] tokens at slots[b][0 .. lens[b]) (slots is [B][L]). Its output is row rows[b] of out
 * (row stride ostride, heads side by side). The g = nq / nkv query heads of a KV head go together,
 * so each key and value is loaded once for all of them. scores: [g][L] scratch from the caller. */
void tpi_attend_decode(const float *q, int64_t qstride, const int64_t *rows, int64_t B, int64_t nq, int64_t nkv,
                       int64_t hd, const float *kpool, const float *vpool, const int64_t *slots, int64_t L,
                       const int64_t *lens, float scale, float *scores, float *out, int64_t ostride) {
    const int64_t g = nq / nkv;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = lens[b];
        const int64_t *sl = slots + b * L;
        for (int64_t kvh = 0; kvh < nkv; kvh++) {
            const int64_t row = rows ? rows[b] : b; /* NULL rows: sequence b is row b */
            const float *qh = q + row * qstride + kvh * g * hd; /* its g query heads, side by side */
            float *o = out + row * ostride + kvh * g * hd;
            for (int64_t l = 0; l < n; l++) {
                const float *k = kpool + (sl[l] * nkv + kvh) * hd;
                for (int64_t i = 0; i < g; i++) scores[i * L + l] = dot(qh + i * hd, k, hd) * scale;
            }
            for (int64_t i = 0; i < g; i++) { /* softmax of each head's n scores */
                float *s = scores + i * L, mx = -INFINITY, sum = 0.0f;
                for (int64_t l = 0; l < n; l++) mx = s[l] > mx ? s[l] : mx;
                for (int64_t l = 0; l < n; l++) {
                    s[l] = expf(s[l] - mx);
                    sum += s[l];
                }
                const float inv = 1.0f / sum;
                for (int64_t l = 0; l < n; l++) s[l] *= inv;
            }
            memset(o, 0, sizeof(float) * g * hd);
            for (int64_t l = 0; l < n; l++) {
                const float *v = vpool + (sl[l] * nkv + kvh) * hd;
                for (int64_t i = 0; i < g; i++) {
                    const float p = scores[i * L + l];
                    float *oi = o + i * hd;
                    for (int64_t e = 0; e < hd; e++) oi[e] += p * v[e];
                }
            }
        }
    }
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
    const int64_t width = (nq + 2 * nkv) * hd, g = nq / nkv;
    float *qkv = malloc(sizeof(float) * (T * width + T * nq * hd + g * L));
    if (!qkv) return -1;
    float *att = qkv + T * width, *scores = att + T * nq * hd;
    int rc = qmm(q8, kind_qkv, h, T, H, wqkv, width, qkv, threads);
    if (rc == 0) {
        if (bqkv)
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = 0; i < width; i++) qkv[t * width + i] += bqkv[i];
        tpi_rope_store(qkv, T, nq, nkv, hd, cos, sin, kpool, vpool, slots);
        tpi_attend_decode(qkv, width, NULL, T, nq, nkv, hd, kpool, vpool, dslots, L, lens, scale, scores, att,
                          nq * hd);
        rc = qmm(q8, kind_o, att, T, nq * hd, wo, H, out, threads);
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
