/* Fused GroupNorm + per-sample affine + activation for channels_last float32 tensors (CPU).
 *
 * Computes, for x of shape (B, HW, C) in memory (NHWC), G groups of D = C / G channels:
 *
 *     v   = x + pre[b, c]                                  (pre optional, e.g. a timestep bias)
 *     mu  = mean of v over (HW, channels of g),  rstd = 1 / sqrt(var + eps)   (biased var)
 *     z   = (v - mu) * rstd * a[b, c] + s[b, c]
 *     y   = act(z),  act in {identity, SiLU}
 *
 * and the backward pass (dx, dpre, da, ds) in two sweeps over the data. PyTorch's own
 * channels_last GroupNorm backward handles each D-float group slice separately, which is
 * slow for D = 2 or 4 (the common 32-group case); here every loop runs along all C
 * contiguous channels, so it vectorises. Statistics are accumulated in double.
 *
 * Work is split over the batch between `threads` workers (see run_parallel). Built at run time by
 * difforge/nn/kernels.py; every entry point returns 0 on success.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* W-float vectors (GCC/Clang vector extensions): 16 lanes where AVX-512 is enabled, else 8
 * (AVX2 registers, or pairs of SSE/NEON ones). Channel counts must be a multiple of W. */
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
/* Rows per float partial sum before it is added into the double accumulators. */
#define BLOCK 64

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float x) { return (vf){0} + x; }

/* exp(x), vectorised: Cody-Waite reduction x = n ln2 + r and the Cephes polynomial for e^r. */
static inline vf vexp(vf x) {
    vi hi = (vi)(x > splat(88.0f)), lo = (vi)(x < splat(-87.0f));
    x = (vf)(((vi)x & ~hi & ~lo) | ((vi)splat(88.0f) & hi) | ((vi)splat(-87.0f) & lo));
    vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);      /* truncation ... */
    n += (vi)(__builtin_convertvector(n, vf) > t); /* ... corrected to floor (true = -1) */
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vf)((n + 127) << 23);
}

static inline vf vsigmoid(vf z) { return 1.0f / (1.0f + vexp(-z)); }

int difforge_gn_act_width(void) { return W; }

typedef struct {
    long B, HW, C, G;
    float eps;
    int act; /* 0 identity, 1 SiLU */
    const float *x, *pre, *a, *s; /* x: (B, HW, C); pre, a, s: (B, C); pre may be NULL */
    float *y;                     /* forward output (B, HW, C) */
    float *mean, *rstd;           /* (B, G): written by forward, read by backward */
    const float *g;               /* backward: incoming gradient (B, HW, C) */
    float *dx, *dpre, *da, *ds;   /* backward outputs; dx (B, HW, C), the rest (B, C) */
    long b_begin, b_step;
    int status;
} job_t;

/* Add the float partial sums `part` (n floats) into `acc` (doubles) and clear them. */
static void flush(double *acc, float *part, long n) {
    for (long c = 0; c < n; c++) {
        acc[c] += part[c];
        part[c] = 0.0f;
    }
}

static void *forward_worker(void *arg) {
    job_t *j = (job_t *)arg;
    const long HW = j->HW, C = j->C, G = j->G, D = C / G;
    double *acc = malloc(sizeof(double) * 2 * C);
    float *buf = malloc(sizeof(float) * 5 * C);
    if (!acc || !buf) {
        free(acc);
        free(buf);
        j->status = 1;
        return NULL;
    }
    double *sd = acc, *sdd = acc + C;                 /* sums of d = x - k and d^2 */
    float *part = buf, *k = buf + 2 * C, *A = buf + 3 * C, *Bv = buf + 4 * C;
    for (long b = j->b_begin; b < j->B; b += j->b_step) {
        const float *x = j->x + b * HW * C;
        const float *pre = j->pre ? j->pre + b * C : NULL;
        const float *a = j->a + b * C, *s = j->s + b * C;
        /* Per-channel moments, shifted by the first pixel so that E[d^2] - E[d]^2 is exact-ish. */
        memcpy(k, x, sizeof(float) * C);
        memset(acc, 0, sizeof(double) * 2 * C);
        memset(part, 0, sizeof(float) * 2 * C);
        for (long i = 0; i < HW; i++) {
            const float *row = x + i * C;
            for (long c = 0; c < C; c += W) {
                vf d = load(row + c) - load(k + c);
                store(part + c, load(part + c) + d);
                store(part + C + c, load(part + C + c) + d * d);
            }
            if ((i + 1) % BLOCK == 0 || i + 1 == HW) flush(acc, part, 2 * C);
        }
        for (long g = 0; g < G; g++) {
            /* Pool the D channels: mean of channel means, plus their spread (parallel variance). */
            double mu = 0.0, m2 = 0.0;
            for (long c = g * D; c < (g + 1) * D; c++) mu += k[c] + (pre ? pre[c] : 0.0f) + sd[c] / HW;
            mu /= D;
            for (long c = g * D; c < (g + 1) * D; c++) {
                double mc = k[c] + (pre ? pre[c] : 0.0f) + sd[c] / HW;
                m2 += sdd[c] - sd[c] * sd[c] / HW + HW * (mc - mu) * (mc - mu);
            }
            double var = m2 / (double)(HW * D);
            double r = 1.0 / sqrt((var > 0.0 ? var : 0.0) + j->eps);
            j->mean[b * G + g] = (float)mu;
            j->rstd[b * G + g] = (float)r;
            for (long c = g * D; c < (g + 1) * D; c++) {
                double p = pre ? pre[c] : 0.0;
                A[c] = (float)(r * a[c]);
                Bv[c] = (float)((p - mu) * r * a[c] + s[c]);
            }
        }
        float *y = j->y + b * HW * C;
        for (long i = 0; i < HW; i++) {
            const float *xr = x + i * C;
            float *yr = y + i * C;
            for (long c = 0; c < C; c += W) {
                vf z = load(xr + c) * load(A + c) + load(Bv + c);
                store(yr + c, j->act ? z * vsigmoid(z) : z);
            }
        }
    }
    free(acc);
    free(buf);
    return NULL;
}

static void *backward_worker(void *arg) {
    job_t *j = (job_t *)arg;
    const long HW = j->HW, C = j->C, G = j->G, D = C / G;
    double *acc = malloc(sizeof(double) * 3 * C);
    float *buf = malloc(sizeof(float) * 7 * C);
    if (!acc || !buf) {
        free(acc);
        free(buf);
        j->status = 1;
        return NULL;
    }
    double *s1 = acc, *s2 = acc + C, *sxc = acc + 2 * C;
    float *part = buf, *A = buf + 3 * C, *Bv = buf + 4 * C, *K = buf + 5 * C, *P = buf + 6 * C;
    float *Q = A, *R = Bv; /* reused once sweep 1 is done */
    for (long b = j->b_begin; b < j->B; b += j->b_step) {
        const float *x = j->x + b * HW * C, *gr = j->g + b * HW * C;
        const float *pre = j->pre ? j->pre + b * C : NULL;
        const float *a = j->a + b * C, *s = j->s + b * C;
        const float *mean = j->mean + b * G, *rstd = j->rstd + b * G;
        float *dx = j->dx + b * HW * C;
        for (long c = 0; c < C; c++) {
            long g = c / D;
            float p = pre ? pre[c] : 0.0f;
            A[c] = rstd[g] * a[c];
            Bv[c] = (p - mean[g]) * rstd[g] * a[c] + s[c];
            K[c] = mean[g] - p; /* x - K = x + pre - mean: the centred input */
        }
        memset(acc, 0, sizeof(double) * 3 * C);
        memset(part, 0, sizeof(float) * 3 * C);
        /* Sweep 1: dz = dy * act'(z) into dx; per-channel sums of dz, dz * xc and xc. */
        for (long i = 0; i < HW; i++) {
            const float *xr = x + i * C, *gi = gr + i * C;
            float *dr = dx + i * C;
            for (long c = 0; c < C; c += W) {
                vf xv = load(xr + c), dz = load(gi + c);
                if (j->act) {
                    vf z = xv * load(A + c) + load(Bv + c), sig = vsigmoid(z);
                    dz *= sig * (1.0f + z * (1.0f - sig));
                }
                vf xc = xv - load(K + c);
                store(dr + c, dz);
                store(part + c, load(part + c) + dz);
                store(part + C + c, load(part + C + c) + dz * xc);
                store(part + 2 * C + c, load(part + 2 * C + c) + xc);
            }
            if ((i + 1) % BLOCK == 0 || i + 1 == HW) flush(acc, part, 3 * C);
        }
        for (long g = 0; g < G; g++) {
            double r = rstd[g], m1 = 0.0, m2 = 0.0;
            for (long c = g * D; c < (g + 1) * D; c++) {
                double da = r * s2[c]; /* sum of dz * xhat */
                j->da[b * C + c] = (float)da;
                j->ds[b * C + c] = (float)s1[c];
                m1 += a[c] * s1[c];
                m2 += a[c] * da;
            }
            double n = (double)(HW * D), q = -r * r * m2 / n, rc = -r * m1 / n;
            for (long c = g * D; c < (g + 1) * D; c++) {
                double pc = r * a[c];
                if (j->dpre) j->dpre[b * C + c] = (float)(pc * s1[c] + q * sxc[c] + HW * rc);
                P[c] = (float)pc;
                Q[c] = (float)q;
                R[c] = (float)(rc - K[c] * q);
            }
        }
        /* Sweep 2: dx = dz * P + x * Q + R  (the GroupNorm backward, every term per channel). */
        for (long i = 0; i < HW; i++) {
            const float *xr = x + i * C;
            float *dr = dx + i * C;
            for (long c = 0; c < C; c += W)
                store(dr + c, load(dr + c) * load(P + c) + load(xr + c) * load(Q + c) + load(R + c));
        }
    }
    free(acc);
    free(buf);
    return NULL;
}

/* Split the batch between `threads` workers. With OpenMP the workers are the threads of the
 * OpenMP runtime already loaded by PyTorch (same soname), so they do not fight PyTorch's
 * spinning pool for the cores; without it, plain pthreads. */
static int run_parallel(job_t *proto, int threads, void *(*worker)(void *)) {
    if (threads < 1) threads = 1;
    if (threads > proto->B) threads = (int)proto->B;
    if (threads > 64) threads = 64;
    job_t jobs[64];
    for (int t = 0; t < threads; t++) {
        jobs[t] = *proto;
        jobs[t].b_begin = t;
        jobs[t].b_step = threads;
        jobs[t].status = 0;
    }
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) worker(&jobs[t]);
    for (int t = 0; t < threads; t++) status |= jobs[t].status;
#else
    pthread_t tids[64];
    int started[64] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tids[t], NULL, worker, &jobs[t]) == 0;
    worker(&jobs[0]);
    status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
        } else {
            worker(&jobs[t]); /* could not start a thread: do its share here */
        }
        status |= jobs[t].status;
    }
#endif
    return status;
}

int difforge_gn_act_forward(const float *x, const float *pre, const float *a, const float *s, float *y,
                            float *mean, float *rstd, long B, long HW, long C, long G, float eps, int act,
                            int threads) {
    if (B <= 0 || HW <= 0 || C <= 0 || G <= 0 || C % G || C % W) return 2;
    job_t job = {0};
    job.B = B, job.HW = HW, job.C = C, job.G = G, job.eps = eps, job.act = act;
    job.x = x, job.pre = pre, job.a = a, job.s = s, job.y = y, job.mean = mean, job.rstd = rstd;
    return run_parallel(&job, threads, forward_worker);
}

int difforge_gn_act_backward(const float *g, const float *x, const float *pre, const float *a,
                             const float *s, const float *mean, const float *rstd, float *dx, float *dpre,
                             float *da, float *ds, long B, long HW, long C, long G, int act, int threads) {
    if (B <= 0 || HW <= 0 || C <= 0 || G <= 0 || C % G || C % W) return 2;
    job_t job = {0};
    job.B = B, job.HW = HW, job.C = C, job.G = G, job.act = act;
    job.g = g, job.x = x, job.pre = pre, job.a = a, job.s = s;
    job.mean = (float *)mean, job.rstd = (float *)rstd;
    job.dx = dx, job.dpre = dpre, job.da = da, job.ds = ds;
    return run_parallel(&job, threads, backward_worker);
}
