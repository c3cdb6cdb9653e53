/* attnkit's fused gate kernels for the CPU: the primitives of attnkit/kernels/reference.py as single passes.
 *
 * gates_impl.h holds every kernel once, written for an element type T; it is included once for float32 and once
 * for bfloat16 (stored as uint16, computed in float32, rounded to nearest even). Each kernel takes `cl`:
 * 0 for NCHW, 1 for channels_last (NHWC). Per-sample factors and statistics are float32; in NHWC the wrapper
 * passes [N, H, C] and [N, W, C] factors ("_t": transposed) so that the inner loop runs along C.
 * Threads: OpenMP with an explicit count; each thread owns whole outputs and sums in a fixed order, so results do
 * not depend on the thread count or timing. */
#include <math.h>
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
