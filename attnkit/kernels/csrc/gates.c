/* attnkit's fused gate kernels for the CPU: the primitives of attnkit/kernels/reference.py as single passes.
 *
 * gates_impl.h holds every kernel once, written for an element type T; it is included once for float32 and once
 * for bfloat16 (stored as uint16, computed in float32, rounded to nearest even). Each kernel takes `cl`:
 * 0 for NCHW, 1 for channels_last (NHWC). Per-sample factors and statistics are float32; in NHWC the wrapper
 * passes [N, H, C] and [N, W, C] factors ("_t": transposed) so that the inner loop runs along C.
 * Threads: OpenMP with an explicit count; each thread owns whole outputs and sums in a fixed order, so results do
 * not depend on the thread count or timing. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

static inline float bf16_load(const uint16_t *p, i64 i) {
    uint32_t bits = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t bf16_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (f != f) return 0x7FC0;
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_round(float f) {
    uint32_t bits = (uint32_t)bf16_bits(f) << 16;
    float r;
    memcpy(&r, &bits, 4);
    return r;
}

/* a > b: a running maximum keeps the first index, as torch.max (a NaN in x makes the gate NaN either way; which
 * position its max gradient reaches is not specified) */
static inline int beats(float a, float b) { return a > b; }

/* e^x within 2 units of the last place for x in [-87.3, 88] (Cephes' expf: x = n·ln 2 + r, a degree-6 polynomial
 * for e^r, times 2^n), saturating outside it, NaN staying NaN. Written without calls or branches (n = ⌊·⌋ by a
 * conversion of a positive value, the clamps as selects) so that loops over it vectorize, as libm's expf and floorf do
 * not without -ffast-math. */
static inline float exp_approx(float x) {
    const float low = x > -87.3f ? x : -87.3f;
    const float c = low < 88.0f ? low : 88.0f;
    const float n = (float)((int32_t)(c * 1.44269504088896341f + 128.5f) - 128);
    const float r = c - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, 4);
    return x != x ? x : p * scale;
}

/* sign(v) as torch.sign: −1, 0 or 1, and 0 for a NaN */
static inline float sign_of(float v) { return (float)(v > 0) - (float)(v < 0); }

static inline float sigmoid(float e) { return 1.0f / (1.0f + exp_approx(-e)); }

/* SE's gate network in channel_gate_module: its activations (0 ReLU, 1 SiLU, 2 hard swish) and gates (0 sigmoid,
 * 1 hard sigmoid), forward and backward as torch writes them (a NaN passes the ReLU; the backward from the gradient,
 * the input z and the output) */
static inline float act_forward(int act, float z) {
    if (act == 0) return z < 0.0f ? 0.0f : z;
    if (act == 1) return z / (1.0f + exp_approx(-z));
    return z * fminf(fmaxf(z + 3.0f, 0.0f), 6.0f) / 6.0f;
}

static inline float act_backward(int act, float grad, float z, float out) {
    if (act == 0) return out > 0.0f ? grad : 0.0f;
    if (act == 1) { const float s = sigmoid(z); return grad * s * (1.0f + z * (1.0f - s)); }
    return z < -3.0f ? 0.0f : (z <= 3.0f ? grad * (z / 3.0f + 0.5f) : grad);
}

static inline float gate_forward(int gate, float z) {
    return gate == 0 ? sigmoid(z) : fminf(fmaxf(z + 3.0f, 0.0f), 6.0f) / 6.0f;
}

static inline float gate_backward(int gate, float grad, float z, float out) {
    return gate == 0 ? grad * (1.0f - out) * out : (z > -3.0f && z < 3.0f ? grad / 6.0f : 0.0f);
}

/* The gate networks of the whole-module kernels (channel_gate_module), on one sample's means s [C]:
 * NET_MLP, SE's: z = W₂ act(W₁ s + b₁) + b₂ (w1 [Hd, C], w2 [C, Hd]; b1, b2 may be NULL; z1 and h the hidden units)
 * NET_WINDOWS, ECA's: z[c] = Σ_i w1[i]·s[c + i − (Hd − 1)/2], a 1-D convolution of Hd taps across the channels,
 * zero beyond them (z1, h unused)
 * then g = gate(z). */
enum { NET_MLP = 0, NET_WINDOWS = 1 };

static void net_forward(int net, const float *s, float *z1, float *h, float *z, float *g, const float *w1,
                        const float *b1, const float *w2, const float *b2, int act, int gate, i64 C, i64 Hd) {
    if (net == NET_WINDOWS) {
        const i64 pad = (Hd - 1) / 2;
        for (i64 c = 0; c < C; c++) {
            float t = 0;
            for (i64 i = 0; i < Hd; i++) {
                const i64 at = c + i - pad;
                if (at >= 0 && at < C) t += w1[i] * s[at];
            }
            z[c] = t;
        }
    } else {
        for (i64 j = 0; j < Hd; j++) {
            const float *wj = w1 + j * C;
            float t = 0;
#pragma omp simd reduction(+ : t)
            for (i64 c = 0; c < C; c++) t += wj[c] * s[c];
            z1[j] = (b1 ? b1[j] : 0.0f) + t;
            h[j] = act_forward(act, z1[j]);
        }
        for (i64 c = 0; c < C; c++) {
            const float *wc = w2 + c * Hd;
            float t = 0;
            for (i64 j = 0; j < Hd; j++) t += wc[j] * h[j];
            z[c] = (b2 ? b2[c] : 0.0f) + t;
        }
    }
    for (i64 c = 0; c < C; c++) g[c] = gate_forward(gate, z[c]);
}

/* net_forward's backward from dg = ∂L/∂g: dz, dz1 (NET_MLP: the hidden units' ∂L/∂z1) and, where ds is not NULL,
 * the means' gradient ∂L/∂s */
static void net_backward(int net, const float *dg, const float *z1, const float *h, const float *z, const float *g,
                         float *dz, float *dz1, float *ds, const float *w1, const float *w2, int act, int gate, i64 C,
                         i64 Hd) {
    for (i64 c = 0; c < C; c++) dz[c] = gate_backward(gate, dg[c], z[c], g[c]);
    if (net == NET_WINDOWS) {
        if (!ds) return;
        const i64 pad = (Hd - 1) / 2;
        for (i64 c = 0; c < C; c++) {
            float t = 0;
            for (i64 i = 0; i < Hd; i++) {
                const i64 at = c - i + pad;
                if (at >= 0 && at < C) t += w1[i] * dz[at];
            }
            ds[c] = t;
        }
        return;
    }
    for (i64 j = 0; j < Hd; j++) dz1[j] = 0;
    for (i64 c = 0; c < C; c++) {
        const float *wc = w2 + c * Hd;
        for (i64 j = 0; j < Hd; j++) dz1[j] += dz[c] * wc[j];
    }
    for (i64 j = 0; j < Hd; j++) dz1[j] = act_backward(act, dz1[j], z1[j], h[j]);
    if (!ds) return;
    for (i64 c = 0; c < C; c++) ds[c] = 0;
    for (i64 j = 0; j < Hd; j++) {
        const float *wj = w1 + j * C;
        const float d = dz1[j];
#pragma omp simd
        for (i64 c = 0; c < C; c++) ds[c] += d * wj[c];
    }
}

/* The weights' gradients over N samples, each summed over the samples in order: s, z1, h of sample n at
 * work + n·fwd (+ C, + C + Hd), dz, dz1 at scratch + n·bwd + C (+ 2C) (the layouts of channel_gate_module) */
static void net_weight_grads(int net, const float *work, const float *scratch, i64 fwd, i64 bwd, float *dw1, float *db1,
                             float *dw2, float *db2, i64 N, i64 C, i64 Hd, int nt) {
    if (net == NET_WINDOWS) {
        const i64 pad = (Hd - 1) / 2;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 i = 0; i < Hd; i++) {
            float t = 0;
            for (i64 n = 0; n < N; n++) {
                const float *s = work + n * fwd, *dz = scratch + n * bwd + C;
                for (i64 c = 0; c < C; c++) {
                    const i64 at = c + i - pad;
                    if (at >= 0 && at < C) t += dz[c] * s[at];
                }
            }
            dw1[i] = t;
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 j = 0; j < Hd; j++) { /* dW₁ = Σ_n dz1ᵀ s, db₁ = Σ_n dz1 */
        float *row = dw1 + j * C, bias = 0;
        for (i64 c = 0; c < C; c++) row[c] = 0;
        for (i64 n = 0; n < N; n++) {
            const float d = scratch[n * bwd + 3 * C + j], *s = work + n * fwd;
            bias += d;
#pragma omp simd
            for (i64 c = 0; c < C; c++) row[c] += d * s[c];
        }
        if (db1) db1[j] = bias;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 c = 0; c < C; c++) { /* dW₂ = Σ_n dzᵀ h, db₂ = Σ_n dz */
        float *row = dw2 + c * Hd, bias = 0;
        for (i64 j = 0; j < Hd; j++) row[j] = 0;
        for (i64 n = 0; n < N; n++) {
            const float d = scratch[n * bwd + C + c], *h = work + n * fwd + C + Hd;
            bias += d;
            for (i64 j = 0; j < Hd; j++) row[j] += d * h[j];
        }
        if (db2) db2[c] = bias;
    }
}

/* SimAM's gate σ(d²/q + ½) of a deviation d from the channel's mean */
static inline float energy_gate(float d, float q) { return sigmoid(d * d / q + 0.5f); }

/* scSE's combinations of x·s and x·q */
enum { PAIR_MAX = 0, PAIR_ADD = 1, PAIR_MUL = 2 };

/* max(a, b), a NaN in either winning, as torch.maximum */
static inline float pair_max(float a, float b) { return (a > b || a != a) ? a : b; }

/* torch.maximum's gradient share of a: 1 where a > b, ½ on a tie */
static inline float max_share(float a, float b) { return a > b ? 1.0f : (a == b ? 0.5f : 0.0f); }

#define T float
#define SFX f32
#define LD(p, i) ((p)[i])
#define ST(p, i, v) ((p)[i] = (v))
#define RND(v) (v)
#include "gates_impl.h"
#undef T
#undef SFX
#undef LD
#undef ST
#undef RND

#define T uint16_t
#define SFX bf16
#define LD(p, i) bf16_load(p, i)
#define ST(p, i, v) ((p)[i] = bf16_bits(v))
#define RND(v) bf16_round(v)
#include "gates_impl.h"

/* ---------- the gate convolution of CBAM and Triplet Attention (float32; an operator of their gate networks) ----------
 * out[n, h, w] = Σ_p Σ_ij wt[p, i, j]·x[n, p, h + i − r, w + j − r]: one k×k filter (r = (k − 1)/2, zero padding)
 * over P pooled maps [N, P, H, W], NCHW. Each map is copied into a zeroed grid r wider on every side, Wp = W + 2r
 * columns, so that every tap is one product over the flat H·Wp grid (the columns past W are discarded): loops that
 * vectorize whatever the map's width, where a loop per row would be a few elements long. Each output's sum over the
 * taps stays in a register (`tap_sums`), rather than making a pass over the output per tap. Work items are samples;
 * the weight gradient is summed per sample, then over the samples in order, so results do not depend on the thread
 * count. `scratch` holds each thread's grids: nt × (P·grid + H·Wp) floats forward, nt × ((P + 1)·grid + H·Wp)
 * backward (grid = (H + 2r + 1)·Wp). */

/* src [H, W] into dst [(H + 2r + 1), Wp], zeroed, at row and column `pad`: the extra row keeps the taps' reads in it */
static void widen(const float *src, float *dst, i64 H, i64 W, i64 Wp, i64 pad) {
    memset(dst, 0, sizeof(float) * (H + 2 * pad + 1) * Wp);
    for (i64 h = 0; h < H; h++) memcpy(dst + (h + pad) * Wp + pad, src + h * W, sizeof(float) * W);
}

/* 16 floats: the sums tap_sums holds in registers, TAP_VECTORS of them at a time (GCC's and Clang's vector types) */
typedef float floats16 __attribute__((vector_size(64)));
#define TAP_VECTORS 4

static inline floats16 load16(const float *p) {
    floats16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* acc[q] = Σ_t w[t]·src[at[t] + q] for q < n, the taps t summed in order from 0 (as passes acc[q] += w[t]·src[at[t] +
 * q] over a zeroed acc would, so with the same roundings), 16·TAP_VECTORS sums at a time held in registers, then 16;
 * the last 16 end at n, recomputing (to the same bits) sums already stored */
static void tap_sums(float *restrict acc, const float *restrict src, const i64 *restrict at, const float *restrict w,
                     i64 taps, i64 n) {
    i64 q0 = 0;
    for (; q0 + 16 * TAP_VECTORS <= n; q0 += 16 * TAP_VECTORS) {
        floats16 s[TAP_VECTORS] = {0};
        for (i64 t = 0; t < taps; t++) {
            const float *x = src + at[t] + q0;
            for (int v = 0; v < TAP_VECTORS; v++) s[v] += w[t] * load16(x + 16 * v);
        }
        memcpy(acc + q0, s, sizeof s);
    }
    for (; q0 < n && n >= 16; q0 += 16) {
        const i64 q = q0 + 16 <= n ? q0 : n - 16;
        floats16 s = {0};
        for (i64 t = 0; t < taps; t++) s += w[t] * load16(src + at[t] + q);
        memcpy(acc + q, &s, sizeof s);
    }
    for (; q0 < n; q0++) { /* fewer than 16 in all */
        float s = 0;
        for (i64 t = 0; t < taps; t++) s += w[t] * src[at[t] + q0];
        acc[q0] = s;
    }
}

/* the valid columns of the wide grid into a map [H, W] */
static void narrow(const float *wide, float *dst, i64 H, i64 W, i64 Wp) {
    for (i64 h = 0; h < H; h++) memcpy(dst + h * W, wide + h * Wp, sizeof(float) * W);
}

void conv_planes_f32(const float *x, const float *wt, float *out, float *scratch, i64 N, i64 P, i64 H, i64 W, i64 k,
                     int nt) {
    const i64 r = (k - 1) / 2, Wp = W + 2 * r, grid = (H + 2 * r + 1) * Wp, wide = H * Wp, taps = P * k * k;
    i64 at[taps]; /* tap (p, i, j) reads the grids at p·grid + i·Wp + j */
    for (i64 p = 0; p < P; p++)
        for (i64 i = 0; i < k; i++)
            for (i64 j = 0; j < k; j++) at[(p * k + i) * k + j] = p * grid + i * Wp + j;
#pragma omp parallel num_threads(nt)
    {
        float *padded = scratch + omp_get_thread_num() * (P * grid + wide), *acc = padded + P * grid;
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            for (i64 p = 0; p < P; p++) widen(x + (n * P + p) * H * W, padded + p * grid, H, W, Wp, r);
            tap_sums(acc, padded, at, wt, taps, wide);
            narrow(acc, out + n * H * W, H, W, Wp);
        }
    }
}

/* dx[n, p, y, x] = Σ_ij wt[p, i, j]·dout[n, y − i + r, x − j + r] (when dx is not NULL);
 * dwt[p, i, j] = Σ_n Σ_hw dout[n, h, w]·x[n, p, h + i − r, w + j − r], through per-sample sums in dwn [N, P·k·k]
 * (when dwt is not NULL) */
void conv_planes_backward_f32(const float *dout, const float *x, const float *wt, float *dx, float *dwn, float *dwt,
                              float *scratch, i64 N, i64 P, i64 H, i64 W, i64 k, int nt) {
    const i64 r = (k - 1) / 2, Wp = W + 2 * r, grid = (H + 2 * r + 1) * Wp, wide = H * Wp, taps = P * k * k;
    i64 at[k * k]; /* dout widened by r: dout[y − i + r, x − j + r] is the grid's [y + 2r − i, x + 2r − j] */
    for (i64 i = 0; i < k; i++)
        for (i64 j = 0; j < k; j++) at[i * k + j] = (2 * r - i) * Wp + 2 * r - j;
#pragma omp parallel num_threads(nt)
    {
        float *padded = scratch + omp_get_thread_num() * ((P + 1) * grid + wide), *acc = padded + (P + 1) * grid;
#pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *g = dout + n * H * W;
            if (dx) {
                widen(g, padded, H, W, Wp, r);
                for (i64 p = 0; p < P; p++) {
                    tap_sums(acc, padded, at, wt + p * k * k, k * k, wide);
                    narrow(acc, dx + (n * P + p) * H * W, H, W, Wp);
                }
            }
            if (dwt) { /* dout on the wide grid, its extra columns 0, against each tap of the widened x */
                float *xs = padded + grid;
                memset(acc, 0, sizeof(float) * wide);
                for (i64 h = 0; h < H; h++) memcpy(acc + h * Wp, g + h * W, sizeof(float) * W);
                for (i64 p = 0; p < P; p++) widen(x + (n * P + p) * H * W, xs + p * grid, H, W, Wp, r);
                for (i64 p = 0; p < P; p++)
                    for (i64 i = 0; i < k; i++)
                        for (i64 j = 0; j < k; j++) {
                            const float *b = xs + p * grid + i * Wp + j;
                            float s = 0;
#pragma omp simd reduction(+ : s)
                            for (i64 q = 0; q < wide; q++) s += acc[q] * b[q];
                            dwn[n * taps + (p * k + i) * k + j] = s;
                        }
            }
        }
    }
    if (dwt)
        for (i64 t = 0; t < taps; t++) {
            float s = 0;
            for (i64 n = 0; n < N; n++) s += dwn[n * taps + t];
            dwt[t] = s;
        }
}
