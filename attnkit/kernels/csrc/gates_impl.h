/* The kernels, once for an element type T (see gates.c): LD loads an element as float, ST stores a float rounded
 * to T, RND rounds a float to T's precision. Factors arrive already rounded to T's precision. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)
#ifndef CB
#define CB 64 /* channels per NHWC work item */
#define PB 512 /* positions per NCHW work item of a reduction over channels */
#define SPAN 64 /* channels summed in float before a double total, in such a reduction */
#define SHORT_ROW 16 /* NCHW rows shorter than this: Coordinate Attention's reductions run plane by plane (BY_WIDTH) */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
/* PLANE(W), with W a constant for the NCHW rows of common maps: the row loops of an inlined plane function then run
 * as whole vectors, where with a variable W short rows run element by element (and rows of 16 to 32 pay a loop's
 * set-up per row: 8-15% of scale_hw and grad_hw at 64×16×32×32 and 64×32×16×16) */
#define BY_WIDTH(W, PLANE) \
    switch (W) { \
    case 2: PLANE(2); break; case 3: PLANE(3); break; case 4: PLANE(4); break; case 5: PLANE(5); break; \
    case 6: PLANE(6); break; case 7: PLANE(7); break; case 8: PLANE(8); break; case 10: PLANE(10); break; \
    case 12: PLANE(12); break; case 14: PLANE(14); break; case 16: PLANE(16); break; case 28: PLANE(28); break; \
    case 32: PLANE(32); break; default: PLANE(W); \
    }
#endif

/* ---------- one gate per channel ---------- */

/* The kernels of one gate per channel work item by item: an NCHW row (n, c), or in NHWC a sample's block of CB
 * channels (the reductions) or a position (the passes that write x's shape); channel_gate_module runs a sample's
 * items in turn */

/* mean[n, c] over H×W of x (of |x| when `absolute`), and m2[n, c] = Σ(x − mean)² when m2 is not NULL */
static inline void FN(pool_hw_item)(const T *x, float *mean, float *m2, int absolute, i64 C, i64 HW, int cl, i64 item) {
    if (!cl) {
        const i64 r = item;
        const T *row = x + r * HW;
        float s = 0; /* a vector of partial sums: float keeps the pass at memory speed */
        if (absolute) {
#pragma omp simd reduction(+ : s)
            for (i64 p = 0; p < HW; p++) s += fabsf(LD(row, p));
        } else {
#pragma omp simd reduction(+ : s)
            for (i64 p = 0; p < HW; p++) s += LD(row, p);
        }
        const float mu = s / HW;
        mean[r] = mu;
        if (m2) {
            float q = 0;
#pragma omp simd reduction(+ : q)
            for (i64 p = 0; p < HW; p++) { const float d = LD(row, p) - mu; q += d * d; }
            m2[r] = q;
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
    const i64 n = item / nb, c0 = (item % nb) * CB, cn = MIN(CB, C - c0);
    const T *base = x + n * HW * C + c0;
    double acc[CB] = {0};
    float mu[CB];
    for (i64 p = 0; p < HW; p++)
        for (i64 j = 0; j < cn; j++) {
            const float v = LD(base + p * C, j);
            acc[j] += absolute ? fabsf(v) : v;
        }
    for (i64 j = 0; j < cn; j++) { mu[j] = (float)(acc[j] / HW); mean[n * C + c0 + j] = mu[j]; acc[j] = 0; }
    if (!m2) return;
    for (i64 p = 0; p < HW; p++)
        for (i64 j = 0; j < cn; j++) { const float d = LD(base + p * C, j) - mu[j]; acc[j] += (double)d * d; }
    for (i64 j = 0; j < cn; j++) m2[n * C + c0 + j] = (float)acc[j];
}

void FN(pool_hw)(const T *x, float *mean, float *m2, int absolute, i64 N, i64 C, i64 HW, int cl, int nt) {
    const i64 items = cl ? N * ((C + CB - 1) / CB) : N * C;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 i = 0; i < items; i++) FN(pool_hw_item)(x, mean, m2, absolute, C, HW, cl, i);
}

/* The value a scaling kernel stores for v at element i: v, or with a residual `res` (not NULL) v rounded to T plus
 * res[i], then max(·, 0) when `relu`: a block's residual sum and ReLU in the gate's pass, rounded as the separate
 * operations round. A NaN passes the ReLU, as torch's passes it. The ReLU clears the bits of a negative sum rather
 * than branching on its sign, which the data makes unpredictable: where a loop does not vectorize (NCHW rows of a
 * few columns in scale_hw), a branch cost 6× the pass. */
static inline float FN(ended)(float v, const T *res, i64 i, int relu) {
    if (!res) return v;
    const float s = RND(v) + LD(res, i);
    uint32_t bits;
    memcpy(&bits, &s, 4);
    bits &= (uint32_t)((relu & (s < 0.0f)) - 1); /* 0 where the ReLU zeroes s, else all ones */
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* y = x · g[n, c] (ended) */
static inline void FN(scale_c_item)(const T *x, const float *g, const T *res, int relu, T *y, i64 C, i64 HW, int cl,
                                    i64 k) {
    const i64 off = k * (cl ? C : HW);
    if (!cl) {
        const float gk = g[k];
        for (i64 p = 0; p < HW; p++) ST(y + off, p, FN(ended)(LD(x + off, p) * gk, res, off + p, relu));
    } else {
        const float *gk = g + (k / HW) * C;
        for (i64 c = 0; c < C; c++) ST(y + off, c, FN(ended)(LD(x + off, c) * gk[c], res, off + c, relu));
    }
}

void FN(scale_c)(const T *x, const float *g, const T *res, int relu, T *y, i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 k = 0; k < (cl ? N * HW : N * C); k++) FN(scale_c_item)(x, g, res, relu, y, C, HW, cl, k);
}

static inline float FN(row_dot)(const T *a, const T *b, i64 n) {
    float s = 0; /* a vector of partial sums */
#pragma omp simd reduction(+ : s)
    for (i64 p = 0; p < n; p++) s += LD(a, p) * LD(b, p);
    return s;
}

/* out[n, c] = Σ_hw dy·x. With `y` (not NULL), the backward of scale_c ended by a ReLU, y its output: dy masked first,
 * dr = dy where y > 0, else 0 (written: the gradient of the residual and of the product), and out = Σ_hw dr·x, summed
 * in the same order */
static inline void FN(dot_hw_item)(const T *dy, const T *y, const T *x, T *dr, float *out, i64 C, i64 HW, int cl,
                                   i64 item) {
    if (!cl) {
        const i64 r = item, off = r * HW;
        if (!y) {
            out[r] = FN(row_dot)(dy + off, x + off, HW);
            return;
        }
        for (i64 p = 0; p < HW; p++) dr[off + p] = LD(y + off, p) > 0 ? dy[off + p] : (T)0;
        out[r] = FN(row_dot)(dr + off, x + off, HW); /* the row just written, from cache */
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
    const i64 n = item / nb, c0 = (item % nb) * CB, cn = MIN(CB, C - c0);
    const i64 off = n * HW * C + c0;
    double acc[CB] = {0};
    for (i64 p = 0; p < HW; p++) {
        const i64 row = off + p * C;
        if (y) /* the mask first, as a loop of selects of its own, which vectorizes */
            for (i64 j = 0; j < cn; j++) dr[row + j] = LD(y, row + j) > 0 ? dy[row + j] : (T)0;
        const T *d = y ? dr : dy;
        for (i64 j = 0; j < cn; j++) acc[j] += LD(d, row + j) * LD(x, row + j);
    }
    for (i64 j = 0; j < cn; j++) out[n * C + c0 + j] = (float)acc[j];
}

void FN(dot_hw)(const T *dy, const T *y, const T *x, T *dr, float *out, i64 N, i64 C, i64 HW, int cl, int nt) {
    const i64 items = cl ? N * ((C + CB - 1) / CB) : N * C;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 i = 0; i < items; i++) FN(dot_hw_item)(dy, y, x, dr, out, C, HW, cl, i);
}

/* dx = dy·g[n, c] + a[n, c] (+ b[n, c]·(x − m[n, c]) when b is not NULL) */
static inline void FN(grad_c_item)(const T *dy, const float *g, const float *a, const T *x, const float *b,
                                   const float *m, T *dx, i64 C, i64 HW, int cl, i64 r) {
    const i64 off = r * (cl ? C : HW);
    if (!cl) {
        const float gr = g[r], ar = a[r];
        if (b) {
            const float br = b[r], mr = m[r];
            for (i64 p = 0; p < HW; p++) ST(dx + off, p, LD(dy + off, p) * gr + ar + br * (LD(x + off, p) - mr));
        } else {
            for (i64 p = 0; p < HW; p++) ST(dx + off, p, LD(dy + off, p) * gr + ar);
        }
    } else {
        const i64 k = (r / HW) * C;
        if (b) {
            for (i64 c = 0; c < C; c++)
                ST(dx + off, c, LD(dy + off, c) * g[k + c] + a[k + c] + b[k + c] * (LD(x + off, c) - m[k + c]));
        } else {
            for (i64 c = 0; c < C; c++) ST(dx + off, c, LD(dy + off, c) * g[k + c] + a[k + c]);
        }
    }
}

void FN(grad_c)(const T *dy, const float *g, const float *a, const T *x, const float *b, const float *m, T *dx,
                i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) FN(grad_c_item)(dy, g, a, x, b, m, dx, C, HW, cl, r);
}

/* dx = dy·g[n, c] + a[n, c]·sign(x) */
void FN(grad_c_sign)(const T *dy, const float *g, const float *a, const T *x, T *dx, i64 N, i64 C, i64 HW, int cl,
                     int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const float gr = g[r], ar = a[r];
            for (i64 p = 0; p < HW; p++) ST(dx + off, p, LD(dy + off, p) * gr + ar * sign_of(LD(x + off, p)));
        } else {
            const i64 k = (r / HW) * C;
            for (i64 c = 0; c < C; c++)
                ST(dx + off, c, LD(dy + off, c) * g[k + c] + a[k + c] * sign_of(LD(x + off, c)));
        }
    }
}

/* ---------- Gather-Excite θ, global extent: a depthwise kernel k covering the map ----------
 * k is [C, HW] for NCHW and [HW, C] for NHWC, float32. */

/* out[n, c] = Σ_hw x·k[c, hw] */
void FN(pool_k)(const T *x, const float *k, float *out, i64 N, i64 C, i64 HW, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const T *row = x + r * HW;
            const float *kr = k + (r % C) * HW;
            double s = 0;
#pragma omp simd reduction(+ : s)
            for (i64 p = 0; p < HW; p++) s += LD(row, p) * kr[p];
            out[r] = (float)s;
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        const T *base = x + n * HW * C + c0;
        double acc[CB] = {0};
        for (i64 p = 0; p < HW; p++)
            for (i64 j = 0; j < cn; j++) acc[j] += LD(base + p * C, j) * k[p * C + c0 + j];
        for (i64 j = 0; j < cn; j++) out[n * C + c0 + j] = (float)acc[j];
    }
}

/* dx = dy·g[n, c] + a[n, c]·k[c, hw] when dx is not NULL; dk[c, hw] = Σ_n a[n, c]·x when dk is not NULL (same
 * layout as k). One pass: each thread owns whole channels (NCHW) or positions (NHWC) across the batch, so dk's sums
 * run over n in order. */
void FN(grad_k)(const T *dy, const float *g, const float *a, const T *x, const float *k, T *dx, float *dk,
                i64 N, i64 C, i64 HW, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 c = 0; c < C; c++) {
            const float *kc = k + c * HW;
            float *dkc = dk ? dk + c * HW : NULL;
            for (i64 n = 0; n < N; n++) {
                const i64 r = n * C + c, off = r * HW;
                const float gr = g[r], ar = a[r];
                if (dx)
                    for (i64 p = 0; p < HW; p++) ST(dx + off, p, LD(dy + off, p) * gr + ar * kc[p]);
                if (dkc) {
                    if (n == 0)
                        for (i64 p = 0; p < HW; p++) dkc[p] = ar * LD(x + off, p);
                    else
                        for (i64 p = 0; p < HW; p++) dkc[p] += ar * LD(x + off, p);
                }
            }
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 p = 0; p < HW; p++) {
        const float *kp = k + p * C;
        float *dkp = dk ? dk + p * C : NULL;
        for (i64 n = 0; n < N; n++) {
            const i64 off = (n * HW + p) * C;
            const float *gn = g + n * C, *an = a + n * C;
            if (dx)
                for (i64 c = 0; c < C; c++) ST(dx + off, c, LD(dy + off, c) * gn[c] + an[c] * kp[c]);
            if (dkp) {
                if (n == 0)
                    for (i64 c = 0; c < C; c++) dkp[c] = an[c] * LD(x + off, c);
                else
                    for (i64 c = 0; c < C; c++) dkp[c] += an[c] * LD(x + off, c);
            }
        }
    }
}

/* ---------- Coordinate Attention: a gate per row and per column of each channel ----------
 * NCHW: per-row factors [N, C, H], per-column [N, C, W]; NHWC: [N, H, C] and [N, W, C]. */

/* One NCHW plane of pool_h_w with rows of a few columns: each row summed in order, and the column sums in place, the
 * rows taken in order. BY_WIDTH inlines it with W a constant. */
static inline __attribute__((always_inline)) void FN(pool_h_w_plane)(const T *restrict plane, float *restrict rows,
        float *restrict columns, i64 H, i64 W) {
    for (i64 w = 0; w < W; w++) columns[w] = 0;
    for (i64 h = 0; h < H; h++) {
        float s = 0;
        for (i64 w = 0; w < W; w++) { const float v = LD(plane, h * W + w); s += v; columns[w] += v; }
        rows[h] = s / W;
    }
    for (i64 w = 0; w < W; w++) columns[w] /= H;
}

/* The joined pools z: per plane, H means over W (zh), then W means over H (zw). NCHW: z [N, C, H+W]; NHWC:
 * [N, H+W, C]. */
void FN(pool_h_w)(const T *x, float *z, i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    const i64 L = H + W;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const T *plane = x + r * H * W;
            float *rows = z + r * L, *accw = rows + H; /* the row and column sums, in place */
            if (W < SHORT_ROW) {
#define PLANE(width) FN(pool_h_w_plane)(plane, rows, accw, H, width)
                BY_WIDTH(W, PLANE);
#undef PLANE
                continue;
            }
            memset(accw, 0, W * sizeof(float));
            for (i64 h = 0; h < H; h++) {
                float s = 0;
#pragma omp simd reduction(+ : s)
                for (i64 w = 0; w < W; w++) { const float v = LD(plane, h * W + w); s += v; accw[w] += v; }
                rows[h] = s / W;
            }
            for (i64 w = 0; w < W; w++) accw[w] /= H;
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        double *accw = calloc(W * CB, sizeof(double));
        for (i64 h = 0; h < H; h++) {
            double acch[CB] = {0};
            for (i64 w = 0; w < W; w++) {
                const T *row = x + ((n * H + h) * W + w) * C + c0;
                for (i64 j = 0; j < cn; j++) { const float v = LD(row, j); acch[j] += v; accw[w * CB + j] += v; }
            }
            for (i64 j = 0; j < cn; j++) z[(n * L + h) * C + c0 + j] = (float)(acch[j] / W);
        }
        for (i64 w = 0; w < W; w++)
            for (i64 j = 0; j < cn; j++) z[(n * L + H + w) * C + c0 + j] = (float)(accw[w * CB + j] / H);
        free(accw);
    }
}

/* One NCHW plane of scale_hw, (x · aw) · ah (ended) */
static inline __attribute__((always_inline)) void FN(scale_hw_plane)(const T *restrict x, const float *restrict ah,
        const float *restrict aw, const T *restrict res, int relu, T *restrict y, i64 H, i64 W) {
    for (i64 h = 0; h < H; h++)
        for (i64 w = 0; w < W; w++) ST(y, h * W + w, RND(LD(x, h * W + w) * aw[w]) * ah[h]);
    if (!res) return;
    /* the block's end over the plane just stored, from cache, as one loop: within the rows of a few columns it
     * does not vectorize. Stored y is the product rounded to T, which is what ended() adds to res. */
    for (i64 i = 0; i < H * W; i++) ST(y, i, FN(ended)(LD(y, i), res, i, relu));
}

/* y = (x · aw) · ah */
void FN(scale_hw)(const T *x, const float *ah, const float *aw, const T *res, int relu, T *y, i64 N, i64 C, i64 H, i64 W,
                   int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const i64 off = r * H * W;
#define PLANE(width) FN(scale_hw_plane)(x + off, ah + r * H, aw + r * W, res ? res + off : NULL, relu, y + off, H, width)
            BY_WIDTH(W, PLANE);
#undef PLANE
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < N * H; r++) {
        const i64 n = r / H;
        const float *a = ah + r * C;
        for (i64 w = 0; w < W; w++) {
            const i64 off = (r * W + w) * C;
            const float *b = aw + (n * W + w) * C;
            for (i64 c = 0; c < C; c++) ST(y + off, c, FN(ended)(RND(LD(x + off, c) * b[c]) * a[c], res, off + c, relu));
        }
    }
}

/* One NCHW plane of dot_h_w with rows of a few columns, each sum taken in order: dah[h] = Σ_w (dy·x)·aw[w], and
 * daw[w] = Σ_h (dy·x)·ah[h] in place. BY_WIDTH inlines it with W a constant. */
static inline __attribute__((always_inline)) void FN(dot_h_w_plane)(const T *restrict dy, const T *restrict x,
        const float *restrict a, const float *restrict b, float *restrict dah, float *restrict daw, i64 H, i64 W) {
    for (i64 w = 0; w < W; w++) daw[w] = 0;
    for (i64 h = 0; h < H; h++) {
        float s = 0;
        for (i64 w = 0; w < W; w++) {
            const float p = LD(dy, h * W + w) * LD(x, h * W + w);
            s += p * b[w];
            daw[w] += p * a[h];
        }
        dah[h] = s;
    }
}

/* dah = Σ_w dy·x·aw, daw = Σ_h dy·x·ah */
void FN(dot_h_w)(const T *dy, const T *x, const float *ah, const float *aw, float *dah, float *daw,
                 i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const i64 off = r * H * W;
            const float *a = ah + r * H, *b = aw + r * W;
            float *accw = daw + r * W; /* the column sums, in place */
            if (W < SHORT_ROW) {
#define PLANE(width) FN(dot_h_w_plane)(dy + off, x + off, a, b, dah + r * H, accw, H, width)
                BY_WIDTH(W, PLANE);
#undef PLANE
                continue;
            }
            memset(accw, 0, W * sizeof(float));
            for (i64 h = 0; h < H; h++) {
                float s = 0;
#pragma omp simd reduction(+ : s)
                for (i64 w = 0; w < W; w++) {
                    const float p = LD(dy + off, h * W + w) * LD(x + off, h * W + w);
                    s += p * b[w];
                    accw[w] += p * a[h];
                }
                dah[r * H + h] = s;
            }
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        double *accw = calloc(W * CB, sizeof(double));
        for (i64 h = 0; h < H; h++) {
            const float *a = ah + (n * H + h) * C + c0;
            double acch[CB] = {0};
            for (i64 w = 0; w < W; w++) {
                const i64 off = ((n * H + h) * W + w) * C + c0;
                const float *b = aw + (n * W + w) * C + c0;
                for (i64 j = 0; j < cn; j++) {
                    const float p = LD(dy + off, j) * LD(x + off, j);
                    acch[j] += p * b[j];
                    accw[w * CB + j] += p * a[j];
                }
            }
            for (i64 j = 0; j < cn; j++) dah[(n * H + h) * C + c0 + j] = (float)acch[j];
        }
        for (i64 w = 0; w < W; w++)
            for (i64 j = 0; j < cn; j++) daw[(n * W + w) * C + c0 + j] = (float)accw[w * CB + j];
        free(accw);
    }
}

/* One NCHW plane of grad_hw; BY_WIDTH inlines it with W a constant */
static inline __attribute__((always_inline)) void FN(grad_hw_plane)(const T *restrict dy, const float *restrict ah,
        const float *restrict aw, const float *restrict bh, const float *restrict bw, T *restrict dx, i64 H, i64 W) {
    for (i64 h = 0; h < H; h++) {
        const float a = ah[h], c = bh[h];
        for (i64 w = 0; w < W; w++) ST(dx, h * W + w, LD(dy, h * W + w) * a * aw[w] + c + bw[w]);
    }
}

/* dx = dy·ah·aw + bh + bw */
void FN(grad_hw)(const T *dy, const float *ah, const float *aw, const float *bh, const float *bw, T *dx,
                 i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const i64 off = r * H * W;
#define PLANE(width) FN(grad_hw_plane)(dy + off, ah + r * H, aw + r * W, bh + r * H, bw + r * W, dx + off, H, width)
            BY_WIDTH(W, PLANE);
#undef PLANE
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < N * H; r++) {
        const i64 n = r / H;
        const float *a = ah + r * C, *c = bh + r * C;
        for (i64 w = 0; w < W; w++) {
            const i64 off = (r * W + w) * C;
            const float *b = aw + (n * W + w) * C, *d = bw + (n * W + w) * C;
            for (i64 k = 0; k < C; k++) ST(dx + off, k, LD(dy + off, k) * a[k] * b[k] + c[k] + d[k]);
        }
    }
}

/* ---------- CBAM: channel gate mc [N, C], then spatial gate ms [N, HW] from the channel-gated map ---------- */

/* the first index of the maximum of n contiguous values: a vectorised max, then a scan for it */
static inline i64 FN(first_max)(const T *row, i64 n, float *best) {
    float m = LD(row, 0);
#pragma omp simd reduction(max : m)
    for (i64 i = 0; i < n; i++) { const float v = LD(row, i); m = v > m ? v : m; }
    *best = m;
    for (i64 i = 0; i < n; i++)
        if (LD(row, i) == m) return i;
    return 0;
}

/* mean, max and first index of the max over H×W, each [N, C] */
void FN(pool_hw_avgmax)(const T *x, float *mean, float *top, i64 *top_at, i64 N, i64 C, i64 HW, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const T *row = x + r * HW;
            float s = 0, m = LD(row, 0); /* vectors of partial sums and maxima: the pass runs at memory speed */
#pragma omp simd reduction(+ : s) reduction(max : m)
            for (i64 p = 0; p < HW; p++) { const float v = LD(row, p); s += v; m = v > m ? v : m; }
            /* the first index of the maximum: a vector search of the row, which is in cache, on int32 lanes */
            int32_t at = INT32_MAX;
            const int32_t n32 = (int32_t)MIN(HW, (i64)INT32_MAX);
#pragma omp simd reduction(min : at)
            for (int32_t p = 0; p < n32; p++) at = LD(row, p) == m && p < at ? p : at;
            mean[r] = s / HW;
            top[r] = m;
            top_at[r] = at < n32 ? at : FN(first_max)(row, HW, &m); /* none: a NaN maximum, or a map of 2³¹ */
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        const T *base = x + n * HW * C + c0;
        double acc[CB];
        float m[CB];
        i64 at[CB];
        for (i64 j = 0; j < cn; j++) { acc[j] = m[j] = LD(base, j); at[j] = 0; }
        for (i64 p = 1; p < HW; p++)
            for (i64 j = 0; j < cn; j++) {
                const float v = LD(base + p * C, j);
                acc[j] += v;
                if (beats(v, m[j])) { m[j] = v; at[j] = p; }
            }
        for (i64 j = 0; j < cn; j++) {
            mean[n * C + c0 + j] = (float)(acc[j] / HW);
            top[n * C + c0 + j] = m[j];
            top_at[n * C + c0 + j] = at[j];
        }
    }
}

/* mean, max and first index of the max over C of t = x·mc (rounded to T), each [N, HW] */
void FN(pool_c_gated)(const T *x, const float *mc, float *mean, float *top, i64 *top_at, i64 N, i64 C, i64 HW,
                      int cl, int nt) {
    if (!cl) {
        const i64 nb = (HW + PB - 1) / PB;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 t = 0; t < N * nb; t++) {
            const i64 n = t / nb, p0 = (t % nb) * PB, pn = MIN(PB, HW - p0);
            /* float sums of up to SPAN channels, added into double totals: the inner loop runs on float and int32
             * lanes of one width, and the sums stay as exact as double ones for any C */
            double total[PB];
            float acc[PB], m[PB];
            int32_t at[PB];
            for (i64 j = 0; j < pn; j++) {
                total[j] = 0;
                acc[j] = m[j] = RND(LD(x + n * C * HW + p0, j) * mc[n * C]);
                at[j] = 0;
            }
            for (i64 c = 1; c < C; c++) {
                if (c % SPAN == 0)
                    for (i64 j = 0; j < pn; j++) { total[j] += acc[j]; acc[j] = 0; }
                const T *row = x + (n * C + c) * HW + p0;
                const float g = mc[n * C + c];
                for (i64 j = 0; j < pn; j++) {
                    const float v = RND(LD(row, j) * g);
                    const int more = beats(v, m[j]);
                    acc[j] += v;
                    m[j] = more ? v : m[j];
                    at[j] = more ? (int32_t)c : at[j];
                }
            }
            for (i64 j = 0; j < pn; j++) {
                mean[n * HW + p0 + j] = (float)((total[j] + acc[j]) / C);
                top[n * HW + p0 + j] = m[j];
                top_at[n * HW + p0 + j] = at[j];
            }
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < N * HW; r++) {
        const T *row = x + r * C;
        const float *g = mc + (r / HW) * C;
        double s = 0;
        float m = RND(LD(row, 0) * g[0]);
        i64 at = 0;
        for (i64 c = 0; c < C; c++) {
            const float v = RND(LD(row, c) * g[c]);
            s += v;
            if (beats(v, m)) { m = v; at = c; }
        }
        mean[r] = (float)(s / C);
        top[r] = m;
        top_at[r] = at;
    }
}

/* y = (x · mc) · ms */
void FN(scale_cs)(const T *x, const float *mc, const float *ms, const T *res, int relu, T *y, i64 N, i64 C, i64 HW,
                   int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const float g = mc[r];
            const float *s = ms + (r / C) * HW;
            for (i64 p = 0; p < HW; p++) ST(y + off, p, FN(ended)(RND(LD(x + off, p) * g) * s[p], res, off + p, relu));
        } else {
            const float *g = mc + (r / HW) * C, s = ms[r];
            for (i64 c = 0; c < C; c++) ST(y + off, c, FN(ended)(RND(LD(x + off, c) * g[c]) * s, res, off + c, relu));
        }
    }
}

/* dmc[n, c] = Σ_hw dy·x·ms, dms[n, hw] = Σ_c dy·(x·mc rounded to T) */
void FN(dot_cs)(const T *dy, const T *x, const float *mc, const float *ms, float *dmc, float *dms,
                i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const T *a = dy + n * C * HW, *b = x + n * C * HW;
        const float *g = mc + n * C, *s = ms + n * HW;
        double *acc = calloc(cl ? C : HW, sizeof(double));
        if (!cl) {
            float *accp = calloc(HW, sizeof(float));
            for (i64 c = 0; c < C; c++) {
                float t = 0;
#pragma omp simd reduction(+ : t)
                for (i64 p = 0; p < HW; p++) {
                    const float d = LD(a, c * HW + p), v = LD(b, c * HW + p);
                    t += d * v * s[p];
                    accp[p] += d * RND(v * g[c]);
                }
                dmc[n * C + c] = t;
            }
            for (i64 p = 0; p < HW; p++) dms[n * HW + p] = accp[p];
            free(accp);
        } else {
            for (i64 p = 0; p < HW; p++) {
                double t = 0;
                for (i64 c = 0; c < C; c++) {
                    const float d = LD(a, p * C + c), v = LD(b, p * C + c);
                    acc[c] += d * v * s[p];
                    t += d * RND(v * g[c]);
                }
                dms[n * HW + p] = (float)t;
            }
            for (i64 c = 0; c < C; c++) dmc[n * C + c] = (float)acc[c];
        }
        free(acc);
    }
}

/* out[n, c] = Σ_hw x·(u[n, hw] + v[n, hw]·[c = argc[n, hw]]) */
void FN(dot_x_s)(const T *x, const float *u, const float *v, const i64 *argc, float *out, i64 N, i64 C, i64 HW,
                 int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const T *b = x + n * C * HW;
        const float *un = u + n * HW, *vn = v + n * HW;
        const i64 *an = argc + n * HW;
        double *acc = calloc(C, sizeof(double));
        if (!cl) {
            for (i64 c = 0; c < C; c++) {
                double t = 0;
#pragma omp simd reduction(+ : t)
                for (i64 p = 0; p < HW; p++) t += LD(b, c * HW + p) * un[p];
                acc[c] = t;
            }
            for (i64 p = 0; p < HW; p++) acc[an[p]] += LD(b, an[p] * HW + p) * vn[p];
        } else {
            for (i64 p = 0; p < HW; p++) {
                for (i64 c = 0; c < C; c++) acc[c] += LD(b, p * C + c) * un[p];
                acc[an[p]] += LD(b, p * C + an[p]) * vn[p];
            }
        }
        for (i64 c = 0; c < C; c++) out[n * C + c] = (float)acc[c];
        free(acc);
    }
}

/* dx = mc·(dy·ms + u + v·[c = argc]) + a[n, c] + b[n, c]·[hw = arghw[n, c]] */
void FN(grad_cs)(const T *dy, const float *mc, const float *ms, const float *u, const float *v, const i64 *argc,
                 const float *a, const float *b, const i64 *arghw, T *dx, i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const i64 n = r / C, c = r % C, top = arghw[r];
            const float g = mc[r], ar = a[r], br = b[r];
            const float *s = ms + n * HW, *un = u + n * HW, *vn = v + n * HW;
            const i64 *an = argc + n * HW;
            for (i64 p = 0; p < HW; p++) {
                const float t = LD(dy + off, p) * s[p] + un[p] + (an[p] == c ? vn[p] : 0.0f);
                ST(dx + off, p, t * g + ar + (p == top ? br : 0.0f));
            }
        } else {
            const i64 n = r / HW, p = r % HW, ac = argc[r];
            const float s = ms[r], ur = u[r], vr = v[r];
            const float *g = mc + n * C, *an = a + n * C, *bn = b + n * C;
            const i64 *tn = arghw + n * C;
            for (i64 c = 0; c < C; c++) {
                const float t = LD(dy + off, c) * s + ur + (c == ac ? vr : 0.0f);
                ST(dx + off, c, t * g[c] + an[c] + (tn[c] == p ? bn[c] : 0.0f));
            }
        }
    }
}

/* ---------- Triplet Attention: Z-pools over H, W and C ----------
 * Factors over the (C, W) plane are [N, C, W] (NHWC: [N, W, C]); over (C, H) [N, C, H] (NHWC: [N, H, C]); over
 * (H, W) [N, HW]. */

/* max, first index of the max and mean over H (mh, ih, uh), over W (mw, iw, uw) and, when mc is not NULL, over C */
void FN(zpool3)(const T *x, float *mh, i64 *ih, float *uh, float *mw, i64 *iw, float *uw, float *mc, i64 *ic,
                float *uc, i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    const i64 HW = H * W;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 n = 0; n < N; n++) {
            float *sh = malloc(W * sizeof(float));
            double *sc = malloc(HW * sizeof(double));
            for (i64 c = 0; c < C; c++) {
                const T *plane = x + (n * C + c) * HW;
                float *th = mh + (n * C + c) * W, *uth = uh + (n * C + c) * W;
                i64 *ith = ih + (n * C + c) * W;
                for (i64 w = 0; w < W; w++) { th[w] = sh[w] = LD(plane, w); ith[w] = 0; }
                for (i64 h = 1; h < H; h++)
                    for (i64 w = 0; w < W; w++) {
                        const float v = LD(plane, h * W + w);
                        const int more = beats(v, th[w]);
                        sh[w] += v; th[w] = more ? v : th[w]; ith[w] = more ? h : ith[w];
                    }
                for (i64 w = 0; w < W; w++) uth[w] = sh[w] / H;
                for (i64 h = 0; h < H; h++) { /* rows are short: one scalar pass for the sum, max and its index */
                    const T *row = plane + h * W;
                    float t = LD(row, 0), top = t;
                    i64 at = 0;
                    for (i64 w = 1; w < W; w++) {
                        const float v = LD(row, w);
                        t += v;
                        if (beats(v, top)) { top = v; at = w; }
                    }
                    const i64 o = (n * C + c) * H + h;
                    uw[o] = t / W; mw[o] = top; iw[o] = at;
                }
                if (!mc) continue;
                float *tc = mc + n * HW;
                i64 *itc = ic + n * HW;
                if (c == 0) {
                    for (i64 p = 0; p < HW; p++) { tc[p] = LD(plane, p); sc[p] = tc[p]; itc[p] = 0; }
                    continue;
                }
                for (i64 p = 0; p < HW; p++) {
                    const float v = LD(plane, p);
                    const int more = beats(v, tc[p]);
                    sc[p] += v; tc[p] = more ? v : tc[p]; itc[p] = more ? c : itc[p];
                }
            }
            if (mc)
                for (i64 p = 0; p < HW; p++) uc[n * HW + p] = (float)(sc[p] / C);
            free(sh); free(sc);
        }
        return;
    }
    /* NHWC: a row of C values per position; the pools over H and W keep running [W, C] and [C] state, the pool over
     * C reduces each row */
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++) {
        float *th = mh + n * W * C, *sh = calloc(W * C, sizeof(float));
        i64 *ith = ih + n * W * C;
        for (i64 h = 0; h < H; h++) {
            const i64 q = (n * H + h) * C;
            float *tw = mw + q, *sw = uw + q;
            i64 *itw = iw + q;
            for (i64 w = 0; w < W; w++) {
                const i64 p = h * W + w;
                const T *row = x + (n * HW + p) * C;
                float *thw = th + w * C, *shw = sh + w * C;
                i64 *ithw = ith + w * C;
                if (h == 0) {
                    for (i64 c = 0; c < C; c++) { const float v = LD(row, c); thw[c] = v; ithw[c] = 0; shw[c] = v; }
                } else {
                    for (i64 c = 0; c < C; c++) {
                        const float v = LD(row, c);
                        const int more = beats(v, thw[c]);
                        shw[c] += v; thw[c] = more ? v : thw[c]; ithw[c] = more ? h : ithw[c];
                    }
                }
                if (w == 0) {
                    for (i64 c = 0; c < C; c++) { const float v = LD(row, c); tw[c] = v; itw[c] = 0; sw[c] = v; }
                } else {
                    for (i64 c = 0; c < C; c++) {
                        const float v = LD(row, c);
                        const int more = beats(v, tw[c]);
                        sw[c] += v; tw[c] = more ? v : tw[c]; itw[c] = more ? w : itw[c];
                    }
                }
                if (mc) {
                    float t = 0;
#pragma omp simd reduction(+ : t)
                    for (i64 c = 0; c < C; c++) t += LD(row, c);
                    uc[n * HW + p] = t / C;
                    ic[n * HW + p] = FN(first_max)(row, C, &mc[n * HW + p]);
                }
            }
            for (i64 c = 0; c < C; c++) sw[c] /= W;
        }
        for (i64 k = 0; k < W * C; k++) uh[n * W * C + k] = sh[k] / H;
        free(sh);
    }
}

/* y = x · (a + b (+ s)) / k, a over (C, W), b over (C, H), s over (H, W) or NULL */
void FN(scale_mean3)(const T *x, const float *a, const float *b, const float *s, float k, T *y,
                     i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    const i64 HW = H * W;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const float *ar = a + r * W;
            for (i64 h = 0; h < H; h++) {
                const float bh = b[r * H + h];
                const i64 off = r * HW + h * W;
                if (s) {
                    const float *sr = s + (r / C) * HW + h * W;
                    for (i64 w = 0; w < W; w++) ST(y + off, w, LD(x + off, w) * RND((ar[w] + bh + sr[w]) / k));
                } else {
                    for (i64 w = 0; w < W; w++) ST(y + off, w, LD(x + off, w) * RND((ar[w] + bh) / k));
                }
            }
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < N * H; r++) {
        const i64 n = r / H, h = r % H;
        const float *br = b + r * C;
        for (i64 w = 0; w < W; w++) {
            const float *ar = a + (n * W + w) * C;
            const i64 off = (r * W + w) * C;
            if (s) {
                const float sv = s[n * HW + h * W + w];
                for (i64 c = 0; c < C; c++) ST(y + off, c, LD(x + off, c) * RND((ar[c] + br[c] + sv) / k));
            } else {
                for (i64 c = 0; c < C; c++) ST(y + off, c, LD(x + off, c) * RND((ar[c] + br[c]) / k));
            }
        }
    }
}

/* Σ_h dy·x (dh), Σ_w dy·x (dw) and, when dc is not NULL, Σ_c dy·x */
void FN(dot3)(const T *dy, const T *x, float *dh, float *dw, float *dc, i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    const i64 HW = H * W;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 n = 0; n < N; n++) {
            float *sh = malloc(W * sizeof(float));
            double *sc = calloc(HW, sizeof(double));
            for (i64 c = 0; c < C; c++) {
                const i64 off = (n * C + c) * HW;
                for (i64 w = 0; w < W; w++) sh[w] = 0;
                for (i64 h = 0; h < H; h++) {
                    float t = 0;
#pragma omp simd reduction(+ : t)
                    for (i64 w = 0; w < W; w++) {
                        const float v = LD(dy + off, h * W + w) * LD(x + off, h * W + w);
                        t += v;
                        sh[w] += v;
                    }
                    dw[(n * C + c) * H + h] = t;
                }
                for (i64 w = 0; w < W; w++) dh[(n * C + c) * W + w] = sh[w];
                if (dc)
                    for (i64 p = 0; p < HW; p++) sc[p] += LD(dy + off, p) * LD(x + off, p);
            }
            if (dc)
                for (i64 p = 0; p < HW; p++) dc[n * HW + p] = (float)sc[p];
            free(sh); free(sc);
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++) {
        float *dhn = dh + n * W * C;
        for (i64 k = 0; k < W * C; k++) dhn[k] = 0;
        for (i64 h = 0; h < H; h++) {
            float *dwr = dw + (n * H + h) * C;
            for (i64 c = 0; c < C; c++) dwr[c] = 0;
            for (i64 w = 0; w < W; w++) {
                const i64 o = (n * HW + h * W + w) * C;
                float *dhw = dhn + w * C, t = 0;
#pragma omp simd reduction(+ : t)
                for (i64 c = 0; c < C; c++) {
                    const float v = LD(dy + o, c) * LD(x + o, c);
                    dhw[c] += v; dwr[c] += v; t += v;
                }
                if (dc) dc[n * HW + h * W + w] = t;
            }
        }
    }
}

/* dx = dy·(a + b (+ s)) / k + Σ over the pooled axes d of (u_d + v_d·[position along d = i_d]) */
void FN(grad_mean3)(const T *dy, const float *a, const float *b, const float *s, float k,
                    const float *vh, const i64 *ih, const float *uh, const float *vw, const i64 *iw, const float *uw,
                    const float *vc, const i64 *ic, const float *uc, T *dx, i64 N, i64 C, i64 H, i64 W, int cl, int nt) {
    const i64 HW = H * W;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const i64 n = r / C, c = r % C, off = r * HW;
            const float *ar = a + r * W, *uhr = uh + r * W, *vhr = vh + r * W;
            const i64 *ihr = ih + r * W;
            for (i64 h = 0; h < H; h++) {
                const float br = b[r * H + h], uwr = uw[r * H + h], vwr = vw[r * H + h];
                const i64 iwr = iw[r * H + h], p0 = h * W;
                if (s) {
                    const float *sn = s + n * HW + p0, *ucn = uc + n * HW + p0, *vcn = vc + n * HW + p0;
                    const i64 *icn = ic + n * HW + p0;
                    for (i64 w = 0; w < W; w++) {
                        float d = LD(dy + off, p0 + w) * RND((ar[w] + br + sn[w]) / k);
                        d = d + uhr[w] + (ihr[w] == h ? vhr[w] : 0.0f);
                        d = d + uwr + (iwr == w ? vwr : 0.0f);
                        d = d + ucn[w] + (icn[w] == c ? vcn[w] : 0.0f);
                        ST(dx + off, p0 + w, d);
                    }
                } else {
                    for (i64 w = 0; w < W; w++) {
                        float d = LD(dy + off, p0 + w) * RND((ar[w] + br) / k);
                        d = d + uhr[w] + (ihr[w] == h ? vhr[w] : 0.0f);
                        d = d + uwr + (iwr == w ? vwr : 0.0f);
                        ST(dx + off, p0 + w, d);
                    }
                }
            }
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < N * H; r++) {
        const i64 n = r / H, h = r % H;
        const float *br = b + r * C, *uwr = uw + r * C, *vwr = vw + r * C;
        const i64 *iwr = iw + r * C;
        for (i64 w = 0; w < W; w++) {
            const i64 kh = (n * W + w) * C, off = (r * W + w) * C, p = n * HW + h * W + w;
            const float *ar = a + kh, *uhr = uh + kh, *vhr = vh + kh;
            const i64 *ihr = ih + kh;
            if (s) {
                const float sv = s[p], ucv = uc[p], vcv = vc[p];
                const i64 icv = ic[p];
                for (i64 c = 0; c < C; c++) {
                    float d = LD(dy + off, c) * RND((ar[c] + br[c] + sv) / k);
                    d = d + uhr[c] + (ihr[c] == h ? vhr[c] : 0.0f);
                    d = d + uwr[c] + (iwr[c] == w ? vwr[c] : 0.0f);
                    d = d + ucv + (icv == c ? vcv : 0.0f);
                    ST(dx + off, c, d);
                }
            } else {
                for (i64 c = 0; c < C; c++) {
                    float d = LD(dy + off, c) * RND((ar[c] + br[c]) / k);
                    d = d + uhr[c] + (ihr[c] == h ? vhr[c] : 0.0f);
                    d = d + uwr[c] + (iwr[c] == w ? vwr[c] : 0.0f);
                    ST(dx + off, c, d);
                }
            }
        }
    }
}

/* ---------- SimAM: an elementwise gate s = σ((x − m)²/q + ½) from per-channel m[n, c], q[n, c] ---------- */

/* y = x · s */
void FN(scale_energy)(const T *x, const float *m, const float *q, T *y, i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const float mr = m[r], qr = q[r];
#pragma omp simd
            for (i64 p = 0; p < HW; p++) {
                const float v = LD(x + off, p);
                ST(y + off, p, v * RND(energy_gate(v - mr, qr)));
            }
        } else {
            const float *mk = m + (r / HW) * C, *qk = q + (r / HW) * C;
#pragma omp simd
            for (i64 c = 0; c < C; c++) {
                const float v = LD(x + off, c);
                ST(y + off, c, v * RND(energy_gate(v - mk[c], qk[c])));
            }
        }
    }
}

/* ta[n, c] = Σ_hw t·d, tb[n, c] = Σ_hw t·d², with d = x − m and t = dy·x·s·(1 − s) */
void FN(dot_energy)(const T *dy, const T *x, const float *m, const float *q, float *ta, float *tb, i64 N, i64 C,
                    i64 HW, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const T *a = dy + r * HW, *b = x + r * HW;
            const float mr = m[r], qr = q[r];
            double sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
            for (i64 p = 0; p < HW; p++) {
                const float v = LD(b, p), d = v - mr, s = energy_gate(d, qr);
                const float td = LD(a, p) * v * s * (1.0f - s) * d;
                sa += td;
                sb += td * d;
            }
            ta[r] = (float)sa;
            tb[r] = (float)sb;
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        const i64 off = n * HW * C + c0;
        const float *mk = m + n * C + c0, *qk = q + n * C + c0;
        double sa[CB] = {0}, sb[CB] = {0};
        for (i64 p = 0; p < HW; p++)
#pragma omp simd
            for (i64 j = 0; j < cn; j++) {
                const float v = LD(x + off + p * C, j), d = v - mk[j], s = energy_gate(d, qk[j]);
                const float td = LD(dy + off + p * C, j) * v * s * (1.0f - s) * d;
                sa[j] += td;
                sb[j] += td * d;
            }
        for (i64 j = 0; j < cn; j++) { ta[n * C + c0 + j] = (float)sa[j]; tb[n * C + c0 + j] = (float)sb[j]; }
    }
}

/* dx = dy·s + d·(2t/q + b[n, c]) + a[n, c], d = x − m, t = dy·x·s·(1 − s) */
void FN(grad_energy)(const T *dy, const T *x, const float *m, const float *q, const float *a, const float *b, T *dx,
                     i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const float mr = m[r], qr = q[r], ar = a[r], br = b[r];
#pragma omp simd
            for (i64 p = 0; p < HW; p++) {
                const float g = LD(dy + off, p), v = LD(x + off, p), d = v - mr, s = energy_gate(d, qr);
                const float t = g * v * s * (1.0f - s);
                ST(dx + off, p, g * RND(s) + d * (2.0f * t / qr + br) + ar);
            }
        } else {
            const i64 k = (r / HW) * C;
#pragma omp simd
            for (i64 c = 0; c < C; c++) {
                const float g = LD(dy + off, c), v = LD(x + off, c), d = v - m[k + c], s = energy_gate(d, q[k + c]);
                const float t = g * v * s * (1.0f - s);
                ST(dx + off, c, g * RND(s) + d * (2.0f * t / q[k + c] + b[k + c]) + a[k + c]);
            }
        }
    }
}

/* ---------- scSE: a channel gate s[n, c] and a spatial gate q[n, hw], combined by max, add or mul ---------- */

/* z[n, hw] = Σ_c w[c]·x */
void FN(pool_c_weighted)(const T *x, const float *w, float *z, i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const T *xn = x + n * C * HW;
        float *zn = z + n * HW;
        if (!cl) {
            double *acc = calloc(HW, sizeof(double));
            for (i64 c = 0; c < C; c++)
                for (i64 p = 0; p < HW; p++) acc[p] += LD(xn, c * HW + p) * w[c];
            for (i64 p = 0; p < HW; p++) zn[p] = (float)acc[p];
            free(acc);
        } else {
            for (i64 p = 0; p < HW; p++) {
                double t = 0;
                for (i64 c = 0; c < C; c++) t += LD(xn, p * C + c) * w[c];
                zn[p] = (float)t;
            }
        }
    }
}

/* one element of scale_pair: x·s and x·q combined */
static inline float FN(pair_value)(float v, float sv, float qv, i64 combine) {
    const float a = RND(v * sv);
    if (combine == PAIR_MUL) return a * qv;
    const float b = RND(v * qv);
    return combine == PAIR_MAX ? pair_max(a, b) : a + b;
}

/* y = max(x·s, x·q), x·s + x·q or (x·s)·q, each product rounded to T */
void FN(scale_pair)(const T *x, const float *s, const float *q, T *y, i64 combine, i64 N, i64 C, i64 HW, int cl,
                    int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const float sv = s[r], *qn = q + (r / C) * HW;
#pragma omp simd
            for (i64 p = 0; p < HW; p++) ST(y + off, p, FN(pair_value)(LD(x + off, p), sv, qn[p], combine));
        } else {
            const float *sn = s + (r / HW) * C, qv = q[r];
#pragma omp simd
            for (i64 c = 0; c < C; c++) ST(y + off, c, FN(pair_value)(LD(x + off, c), sn[c], qv, combine));
        }
    }
}

/* the terms of dot_pair for one element: *tc (towards ds) and *tp (towards dq) */
static inline void FN(pair_terms)(float d, float v, float sv, float qv, i64 combine, float *tc, float *tp) {
    const float a = RND(v * sv);
    if (combine == PAIR_MUL) {
        *tc = d * v * qv;
        *tp = d * a;
        return;
    }
    const float wa = combine == PAIR_MAX ? max_share(a, RND(v * qv)) : 1.0f;
    const float wb = combine == PAIR_MAX ? 1.0f - wa : 1.0f;
    *tc = d * v * wa;
    *tp = d * v * wb;
}

/* ds[n, c] = Σ_hw dy·∂y/∂s, dq[n, hw] = Σ_c dy·∂y/∂q */
void FN(dot_pair)(const T *dy, const T *x, const float *s, const float *q, float *ds, float *dq, i64 combine,
                  i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const T *dn = dy + n * C * HW, *xn = x + n * C * HW;
        const float *sn = s + n * C, *qn = q + n * HW;
        double *acc = calloc(cl ? C : HW, sizeof(double)); /* the sums along the outer loop's axis */
        float tc, tp;
        if (!cl) {
            for (i64 c = 0; c < C; c++) {
                double t = 0;
#pragma omp simd reduction(+ : t) private(tc, tp)
                for (i64 p = 0; p < HW; p++) {
                    FN(pair_terms)(LD(dn, c * HW + p), LD(xn, c * HW + p), sn[c], qn[p], combine, &tc, &tp);
                    t += tc;
                    acc[p] += tp;
                }
                ds[n * C + c] = (float)t;
            }
            for (i64 p = 0; p < HW; p++) dq[n * HW + p] = (float)acc[p];
        } else {
            for (i64 p = 0; p < HW; p++) {
                double t = 0;
#pragma omp simd reduction(+ : t) private(tc, tp)
                for (i64 c = 0; c < C; c++) {
                    FN(pair_terms)(LD(dn, p * C + c), LD(xn, p * C + c), sn[c], qn[p], combine, &tc, &tp);
                    acc[c] += tc;
                    t += tp;
                }
                dq[n * HW + p] = (float)t;
            }
            for (i64 c = 0; c < C; c++) ds[n * C + c] = (float)acc[c];
        }
        free(acc);
    }
}

/* one element of grad_pair's dy·∂y/∂x */
static inline float FN(pair_local)(float d, float v, float sv, float qv, i64 combine) {
    if (combine == PAIR_MUL) return d * sv * qv;
    const float wa = combine == PAIR_MAX ? max_share(RND(v * sv), RND(v * qv)) : 1.0f;
    const float wb = combine == PAIR_MAX ? 1.0f - wa : 1.0f;
    return d * (wa * sv + wb * qv);
}

/* dx = dy·∂y/∂x + a[n, c] + w[c]·dz[n, hw] */
void FN(grad_pair)(const T *dy, const T *x, const float *s, const float *q, const float *a, const float *w,
                   const float *dz, T *dx, i64 combine, i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const i64 n = r / C, c = r % C;
            const float sv = s[r], ar = a[r], wc = w[c], *qn = q + n * HW, *dzn = dz + n * HW;
#pragma omp simd
            for (i64 p = 0; p < HW; p++) {
                const float local = FN(pair_local)(LD(dy + off, p), LD(x + off, p), sv, qn[p], combine);
                ST(dx + off, p, local + ar + wc * dzn[p]);
            }
        } else {
            const i64 n = r / HW;
            const float *sn = s + n * C, *an = a + n * C, qv = q[r], dzv = dz[r];
#pragma omp simd
            for (i64 c = 0; c < C; c++) {
                const float local = FN(pair_local)(LD(dy + off, c), LD(x + off, c), sn[c], qv, combine);
                ST(dx + off, c, local + an[c] + w[c] * dzv);
            }
        }
    }
}

/* ---------- SGE: G equal groups of K = C/G channels; per-group maps [N, G, HW] ---------- */

/* out[n, g, hw] = Σ_{c in g} f·x, f = dy[n, c, hw] when dy is not NULL, else m[n, c] */
static void FN(sum_groups)(const T *x, const float *m, const T *dy, float *out, i64 G, i64 N, i64 C, i64 HW, int cl,
                           int nt) {
    const i64 K = C / G;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * G; r++) {
            const i64 n = r / G, c0 = (r % G) * K;
            double *acc = calloc(HW, sizeof(double));
            for (i64 c = c0; c < c0 + K; c++) {
                const i64 off = (n * C + c) * HW;
                for (i64 p = 0; p < HW; p++) acc[p] += LD(x + off, p) * (dy ? LD(dy + off, p) : m[n * C + c]);
            }
            for (i64 p = 0; p < HW; p++) out[r * HW + p] = (float)acc[p];
            free(acc);
        }
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < N * HW; r++) {
        const i64 n = r / HW, p = r % HW;
        const T *xr = x + r * C, *dr = dy ? dy + r * C : NULL;
        for (i64 g = 0; g < G; g++) {
            double t = 0;
            for (i64 c = g * K; c < (g + 1) * K; c++) t += LD(xr, c) * (dr ? LD(dr, c) : m[n * C + c]);
            out[(n * G + g) * HW + p] = (float)t;
        }
    }
}

void FN(pool_groups)(const T *x, const float *m, float *out, i64 G, i64 N, i64 C, i64 HW, int cl, int nt) {
    FN(sum_groups)(x, m, NULL, out, G, N, C, HW, cl, nt);
}

void FN(dot_groups)(const T *dy, const T *x, float *out, i64 G, i64 N, i64 C, i64 HW, int cl, int nt) {
    FN(sum_groups)(x, NULL, dy, out, G, N, C, HW, cl, nt);
}

/* y = x · a[n, g, hw] */
void FN(scale_groups)(const T *x, const float *a, T *y, i64 G, i64 N, i64 C, i64 HW, int cl, int nt) {
    const i64 K = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const float *ar = a + ((r / C) * G + (r % C) / K) * HW;
            for (i64 p = 0; p < HW; p++) ST(y + off, p, LD(x + off, p) * ar[p]);
        } else {
            const i64 n = r / HW, p = r % HW;
            for (i64 c = 0; c < C; c++) ST(y + off, c, LD(x + off, c) * a[(n * G + c / K) * HW + p]);
        }
    }
}

/* out[n, c] = Σ_hw x·u[n, g, hw] */
void FN(dot_x_groups)(const T *x, const float *u, float *out, i64 G, i64 N, i64 C, i64 HW, int cl, int nt) {
    const i64 K = C / G;
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const T *row = x + r * HW;
            const float *ur = u + ((r / C) * G + (r % C) / K) * HW;
            double t = 0;
            for (i64 p = 0; p < HW; p++) t += LD(row, p) * ur[p];
            out[r] = (float)t;
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        const T *base = x + n * HW * C + c0;
        double acc[CB] = {0};
        for (i64 p = 0; p < HW; p++)
            for (i64 j = 0; j < cn; j++) acc[j] += LD(base + p * C, j) * u[(n * G + (c0 + j) / K) * HW + p];
        for (i64 j = 0; j < cn; j++) out[n * C + c0 + j] = (float)acc[j];
    }
}

/* dx = dy·a[n, g, hw] + u[n, g, hw]·m[n, c] + b[n, c] */
void FN(grad_groups)(const T *dy, const float *a, const float *m, const float *u, const float *b, T *dx, i64 G, i64 N,
                     i64 C, i64 HW, int cl, int nt) {
    const i64 K = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        const i64 off = r * (cl ? C : HW);
        if (!cl) {
            const i64 at = ((r / C) * G + (r % C) / K) * HW;
            const float mr = m[r], br = b[r];
            for (i64 p = 0; p < HW; p++) ST(dx + off, p, LD(dy + off, p) * a[at + p] + u[at + p] * mr + br);
        } else {
            const i64 n = r / HW, p = r % HW;
            for (i64 c = 0; c < C; c++) {
                const i64 at = (n * G + c / K) * HW + p;
                ST(dx + off, c, LD(dy + off, c) * a[at] + u[at] * m[n * C + c] + b[n * C + c]);
            }
        }
    }
}

/* ---------- Shuffle Attention: s = σ(α[n, c]·(x − m[n, c]) + β[n, c]); y and dy in channels perm[c] ---------- */

/* y[n, perm[c]] = x · s */
void FN(scale_affine)(const T *x, const float *alpha, const float *beta, const float *m, const i64 *perm, T *y, i64 N,
                      i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        if (!cl) {
            const i64 n = r / C, c = r % C;
            const float al = alpha[r], be = beta[r], mr = m[r];
            const T *xr = x + r * HW;
            T *yr = y + (n * C + perm[c]) * HW;
#pragma omp simd
            for (i64 p = 0; p < HW; p++) {
                const float v = LD(xr, p);
                ST(yr, p, v * RND(sigmoid(al * (v - mr) + be)));
            }
        } else {
            const i64 k = (r / HW) * C;
            const T *xr = x + r * C;
            T *yr = y + r * C;
            for (i64 c = 0; c < C; c++) {
                const float v = LD(xr, c);
                ST(yr, perm[c], v * RND(sigmoid(alpha[k + c] * (v - m[k + c]) + beta[k + c])));
            }
        }
    }
}

/* ta[n, c] = Σ_hw t·(x − m), tb[n, c] = Σ_hw t, t = dy[n, perm[c]]·x·s·(1 − s) */
void FN(dot_affine)(const T *dy, const T *x, const float *alpha, const float *beta, const float *m, const i64 *perm,
                    float *ta, float *tb, i64 N, i64 C, i64 HW, int cl, int nt) {
    if (!cl) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (i64 r = 0; r < N * C; r++) {
            const i64 n = r / C, c = r % C;
            const T *xr = x + r * HW, *dr = dy + (n * C + perm[c]) * HW;
            const float al = alpha[r], be = beta[r], mr = m[r];
            double sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
            for (i64 p = 0; p < HW; p++) {
                const float v = LD(xr, p), d = v - mr, s = sigmoid(al * d + be);
                const float t = LD(dr, p) * v * s * (1.0f - s);
                sa += t * d;
                sb += t;
            }
            ta[r] = (float)sa;
            tb[r] = (float)sb;
        }
        return;
    }
    const i64 nb = (C + CB - 1) / CB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < N * nb; t++) {
        const i64 n = t / nb, c0 = (t % nb) * CB, cn = MIN(CB, C - c0);
        const i64 k = n * C + c0;
        double sa[CB] = {0}, sb[CB] = {0};
        for (i64 p = 0; p < HW; p++) {
            const T *xr = x + (n * HW + p) * C, *dr = dy + (n * HW + p) * C;
            for (i64 j = 0; j < cn; j++) {
                const float v = LD(xr, c0 + j), d = v - m[k + j], s = sigmoid(alpha[k + j] * d + beta[k + j]);
                const float g = LD(dr, perm[c0 + j]) * v * s * (1.0f - s);
                sa[j] += g * d;
                sb[j] += g;
            }
        }
        for (i64 j = 0; j < cn; j++) { ta[k + j] = (float)sa[j]; tb[k + j] = (float)sb[j]; }
    }
}

/* dx = dy[n, perm[c]]·s + t·α + a[n, c] + b[n, c]·(x − m[n, c]) */
void FN(grad_affine)(const T *dy, const T *x, const float *alpha, const float *beta, const float *m, const float *a,
                     const float *b, const i64 *perm, T *dx, i64 N, i64 C, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 r = 0; r < (cl ? N * HW : N * C); r++) {
        if (!cl) {
            const i64 n = r / C, c = r % C;
            const T *xr = x + r * HW, *dr = dy + (n * C + perm[c]) * HW;
            const float al = alpha[r], be = beta[r], mr = m[r], ar = a[r], br = b[r];
#pragma omp simd
            for (i64 p = 0; p < HW; p++) {
                const float v = LD(xr, p), d = v - mr, s = sigmoid(al * d + be), g = LD(dr, p);
                const float t = g * v * s * (1.0f - s);
                ST(dx + r * HW, p, g * RND(s) + t * al + ar + br * d);
            }
        } else {
            const i64 k = (r / HW) * C;
            const T *xr = x + r * C, *dr = dy + r * C;
            for (i64 c = 0; c < C; c++) {
                const float v = LD(xr, c), d = v - m[k + c], s = sigmoid(alpha[k + c] * d + beta[k + c]);
                const float g = LD(dr, perm[c]), t = g * v * s * (1.0f - s);
                ST(dx + r * C, c, g * RND(s) + t * alpha[k + c] + a[k + c] + b[k + c] * d);
            }
        }
    }
}

/* ---------- SE's and ECA's whole module, sample by sample (channel_gate_module) ----------
 * The pooling, the gate network (net_forward: SE's or ECA's) and the scaling (ended), one sample after the other, each
 * thread taking whole samples: the sample's map, read by the pooling, is still in cache when the scaling reads it,
 * and the gate network, a few thousand multiply-adds per sample, runs in the same call. A sample's work items of
 * pool_hw, scale_c, dot_hw and grad_c, so the same results as those kernels for the same gates.
 * forward: per sample MODULE_FWD floats of `work`: s, z1, h, z, g and g rounded to T (the scaling's factor)
 * backward: per sample MODULE_BWD floats of `scratch`: Σ_hw dy·x, dz, the pooling's gradient, dz1; with a ReLU ending
 * (y not NULL) dr = dy masked by y > 0 is written (the residual's gradient); dx where it is not NULL; the weights'
 * gradients (where dw1 is not NULL) after the samples (net_weight_grads) */
#define MODULE_FWD(C, Hd) (4 * (C) + 2 * (Hd))
#define MODULE_BWD(C, Hd) (3 * (C) + (Hd))

static void FN(module_sample)(const T *x, const T *res, int relu, T *y, float *work, int net, const float *w1,
                              const float *b1, const float *w2, const float *b2, int act, int gate, i64 n, i64 C,
                              i64 Hd, i64 HW, int cl) {
    float *s = work + n * MODULE_FWD(C, Hd), *z1 = s + C, *h = z1 + Hd, *z = h + Hd, *g = z + C, *factor = g + C;
    const i64 blocks = cl ? (C + CB - 1) / CB : C, rows = cl ? HW : C;
    for (i64 i = n * blocks; i < (n + 1) * blocks; i++) FN(pool_hw_item)(x, s - n * C, NULL, 0, C, HW, cl, i);
    net_forward(net, s, z1, h, z, g, w1, b1, w2, b2, act, gate, C, Hd);
    for (i64 c = 0; c < C; c++) factor[c] = RND(g[c]);
    for (i64 i = n * rows; i < (n + 1) * rows; i++) FN(scale_c_item)(x, factor - n * C, res, relu, y, C, HW, cl, i);
}

void FN(channel_gate_module)(const T *x, const T *res, int relu, T *y, float *work, int net, const float *w1,
                             const float *b1, const float *w2, const float *b2, int act, int gate, i64 N, i64 C,
                             i64 Hd, i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++)
        FN(module_sample)(x, res, relu, y, work, net, w1, b1, w2, b2, act, gate, n, C, Hd, HW, cl);
}

static void FN(module_sample_backward)(const T *dy, const T *y, const T *x, T *dr, T *dx, const float *work,
                                       float *scratch, int net, const float *w1, const float *w2, int act, int gate,
                                       i64 n, i64 C, i64 Hd, i64 HW, int cl) {
    const float *z1 = work + n * MODULE_FWD(C, Hd) + C, *h = z1 + Hd, *z = h + Hd, *g = z + C, *factor = g + C;
    float *dg = scratch + n * MODULE_BWD(C, Hd), *dz = dg + C, *a = dz + C, *dz1 = a + C;
    const i64 blocks = cl ? (C + CB - 1) / CB : C, rows = cl ? HW : C;
    for (i64 i = n * blocks; i < (n + 1) * blocks; i++) FN(dot_hw_item)(dy, y, x, dr, dg - n * C, C, HW, cl, i);
    net_backward(net, dg, z1, h, z, g, dz, dz1, dx ? a : NULL, w1, w2, act, gate, C, Hd);
    if (!dx) return;
    for (i64 c = 0; c < C; c++) a[c] /= (float)HW;
    for (i64 i = n * rows; i < (n + 1) * rows; i++)
        FN(grad_c_item)(y ? dr : dy, factor - n * C, a - n * C, NULL, NULL, NULL, dx, C, HW, cl, i);
}

void FN(channel_gate_module_backward)(const T *dy, const T *y, const T *x, T *dr, T *dx, const float *work,
                                      float *scratch, int net, const float *w1, const float *w2, float *dw1,
                                      float *db1, float *dw2, float *db2, int act, int gate, i64 N, i64 C, i64 Hd,
                                      i64 HW, int cl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 n = 0; n < N; n++)
        FN(module_sample_backward)(dy, y, x, dr, dx, work, scratch, net, w1, w2, act, gate, n, C, Hd, HW, cl);
    if (dw1)
        net_weight_grads(net, work, scratch, MODULE_FWD(C, Hd), MODULE_BWD(C, Hd), dw1, db1, dw2, db2, N, C, Hd, nt);
}
