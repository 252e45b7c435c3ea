/* Fused GroupNorm (+ optional SiLU) over NCHW; one work-group per (batch, group).
 * Pass 1 reads the group once: each work-item keeps a Welford (count, mean, M2) over a strided
 * slice, and the work-group merges them pairwise (Chan et al.) in local memory, so mean and
 * variance come from a single read and stay accurate. Pass 2 reads again and writes
 * silu(gamma * (x - mean) * rstd + beta): no intermediate tensor, one kernel launch.
 * The local size must be a power of two. */
/* Welford (count, mean, M2) of x[base + i] for i in [start, end), each work-item over a strided
 * slice, merged pairwise across the work-group (Chan et al.) into lc[0], lmean[0], lm2[0].
 * The local size must be a power of two. */
void welford_work_group(__global const T* x, const int base, const int start, const int end,
                        __local float* lc, __local float* lmean, __local float* lm2) {
    const int lid = get_local_id(0), L = get_local_size(0);
    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int i = start + lid; i < end; i += L) {
        const float v = LD(x, base + i);
        cnt += 1.0f;
        const float d = v - mean;
        mean += d / cnt;
        m2 += d * (v - mean);
    }
    lc[lid] = cnt; lmean[lid] = mean; lm2[lid] = m2;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k = L / 2; k > 0; k >>= 1) {
        if (lid < k) {
            const float na = lc[lid], nb = lc[lid + k];
            const float nab = na + nb;
            if (nb > 0.0f) {
                const float d = lmean[lid + k] - lmean[lid];
                lmean[lid] = lmean[lid] + d * (nb / nab);
                lm2[lid] = lm2[lid] + lm2[lid + k] + d * d * (na * nb / nab);
                lc[lid] = nab;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}

#ifndef OT
#define OT char
#endif
inline OT quantize_f(const float v, const float s, const int zp, const int lo, const int hi) {
    return (OT)clamp(rint(v / s) + (float)zp, (float)lo, (float)hi);
}

/* The grid(s) of a quantized store: channels [0, split) on (s1, z1), the rest on (s2, z2). */
typedef struct { float s1, s2; int z1, z2, split, lo, hi; } qgrid;

/* x[i] normalised with channel c's affine (+SiLU), stored into y or (yq not null) quantized into yq. */
inline void norm_store(__global const T* x, __global T* y, __global OT* yq, const int i, const int c, const float mean,
                       const float rstd, __global const float* gamma, __global const float* beta, const int apply_silu,
                       const qgrid q) {
    float v = (LD(x, i) - mean) * rstd * gamma[c] + beta[c];
    if (apply_silu) v = silu_f(v);
    if (yq) yq[i] = c < q.split ? quantize_f(v, q.s1, q.z1, q.lo, q.hi) : quantize_f(v, q.s2, q.z2, q.lo, q.hi);
    else ST(y, i, v);
}

/* One work-group per (batch, group): statistics, then every element normalised (+SiLU) and
 * stored as T into y, or (yq not null) quantized onto the grid (qs, qz, qlo, qhi) into yq. */
void group_norm_wg(__global const T* x, __global const float* gamma, __global const float* beta, __global T* y,
                   __global OT* yq, const int C, const int HW, const int G, const float eps, const int apply_silu,
                   __local float* lc, __local float* lmean, __local float* lm2, const qgrid q) {
    const int bg = get_group_id(0);
    const int b = bg / G, g = bg - (bg / G) * G;
    const int cpg = C / G;
    const int n = cpg * HW;
    const int base = (b * C + g * cpg) * HW;  /* a group's channels are contiguous in NCHW */
    const int lid = get_local_id(0), L = get_local_size(0);
    welford_work_group(x, base, 0, n, lc, lmean, lm2);
    const float mu = lmean[0];
    const float rstd = 1.0f / sqrt(lm2[0] / lc[0] + eps);
    for (int i = lid; i < n; i += L) {
        norm_store(x, y, yq, base + i, g * cpg + i / HW, mu, rstd, gamma, beta, apply_silu, q);
    }
}

__kernel void group_norm(__global const T* x, __global const float* gamma, __global const float* beta,
                         __global T* y, const int C, const int HW, const int G, const float eps,
                         const int apply_silu, __local float* lc, __local float* lmean, __local float* lm2) {
    const qgrid none = {1.0f, 1.0f, 0, 0, C, 0, 0};
    group_norm_wg(x, gamma, beta, y, 0, C, HW, G, eps, apply_silu, lc, lmean, lm2, none);
}

/* The unfused baseline (what a framework does op by op): statistics to a buffer, then a
 * normalisation kernel writing a tensor, then a separate SiLU kernel. Used by the benchmark to
 * measure what fusion saves; a naive two-read mean/variance as in a textbook implementation. */
__kernel void group_stats(__global const T* x, __global float* stats, const int C, const int HW, const int G,
                          const float eps, __local float* ls, __local float* ls2) {
    const int bg = get_group_id(0);
    const int b = bg / G, g = bg - (bg / G) * G;
    const int cpg = C / G, n = cpg * HW, base = (b * C + g * cpg) * HW;
    const int lid = get_local_id(0), L = get_local_size(0);
    float s = 0.0f;
    for (int i = lid; i < n; i += L) s += LD(x, base + i);
    ls[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k = L / 2; k > 0; k >>= 1) {
        if (lid < k) ls[lid] += ls[lid + k];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float mu = ls[0] / n;
    float s2 = 0.0f;
    for (int i = lid; i < n; i += L) { const float d = LD(x, base + i) - mu; s2 += d * d; }
    ls2[lid] = s2;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k = L / 2; k > 0; k >>= 1) {
        if (lid < k) ls2[lid] += ls2[lid + k];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) { stats[2 * bg] = mu; stats[2 * bg + 1] = 1.0f / sqrt(ls2[0] / n + eps); }
}

__kernel void group_norm_apply(__global const T* x, __global const float* stats, __global const float* gamma,
                               __global const float* beta, __global T* y, const int C, const int HW, const int G,
                               const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int c = (i / HW) % C;
    const int bg = (i / (HW * C)) * G + c / (C / G);
    ST(y, i, (LD(x, i) - stats[2 * bg]) * stats[2 * bg + 1] * gamma[c] + beta[c]);
}

/* The chunk work-group (bg, s) of the split kernels covers: elements [start, end) of group bg,
 * which starts at x[base]; returns bg. */
int split_chunk(const int C, const int HW, const int G, const int S, int* start, int* end, int* base) {
    const int bgs = get_group_id(0);
    const int bg = bgs / S, s = bgs - (bgs / S) * S;
    const int b = bg / G, g = bg - (bg / G) * G;
    const int cpg = C / G, n = cpg * HW;
    const int chunk = (n + S - 1) / S;
    *start = s * chunk;
    *end = min(n, *start + chunk);
    *base = (b * C + g * cpg) * HW;
    return bg;
}

/* Mean and 1/std of group bg from its S Welford partials (Chan et al. merge, in the same order in
 * every work-item, so every chunk normalises with the same statistics). */
float merge_partials(__global const float* part, const int bg, const int S, const float eps, float* mean_out) {
    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int j = 0; j < S; ++j) {
        const float nb = part[3 * (bg * S + j)];
        if (nb > 0.0f) {
            const float nab = cnt + nb, d = part[3 * (bg * S + j) + 1] - mean;
            mean += d * (nb / nab);
            m2 += part[3 * (bg * S + j) + 2] + d * d * (cnt * nb / nab);
            cnt = nab;
        }
    }
    *mean_out = mean;
    return 1.0f / sqrt(m2 / cnt + eps);
}

/* GroupNorm split across work-groups (two passes), for when B x G work-groups would leave most
 * compute units idle (a batch-1 UNet level has 32 groups, a mobile GPU 8-16 cores x several
 * resident work-groups each). Pass 1: work-group (bg, s) reduces chunk s of group bg to a
 * Welford partial (count, mean, M2) in `part`. Pass 2: work-group (bg, s) merges the S partials
 * of its group (each work-item, from global memory: 3 x S floats, cached) and normalises chunk s.
 * Every element is read twice and written once, as in the one-group kernel. */
__kernel void group_partial_stats(__global const T* x, __global float* part, const int C, const int HW, const int G,
                                  const int S, __local float* lc, __local float* lmean, __local float* lm2) {
    int start, end, base;
    split_chunk(C, HW, G, S, &start, &end, &base);
    welford_work_group(x, base, start, end, lc, lmean, lm2);
    const int bgs = get_group_id(0);
    if (get_local_id(0) == 0) { part[3 * bgs] = lc[0]; part[3 * bgs + 1] = lmean[0]; part[3 * bgs + 2] = lm2[0]; }
}

/* Pass 2 for chunk (bg, s): stored as T into y, or (yq not null) quantized into yq. */
void group_norm_split_chunk(__global const T* x, __global const float* part, __global const float* gamma,
                            __global const float* beta, __global T* y, __global OT* yq, const int C, const int HW,
                            const int G, const int S, const float eps, const int apply_silu, const qgrid q) {
    int start, end, base;
    const int bg = split_chunk(C, HW, G, S, &start, &end, &base);
    const int g = bg % G, cpg = C / G;
    float mean;
    const float rstd = merge_partials(part, bg, S, eps, &mean);
    for (int i = start + get_local_id(0); i < end; i += get_local_size(0)) {
        norm_store(x, y, yq, base + i, g * cpg + i / HW, mean, rstd, gamma, beta, apply_silu, q);
    }
}

__kernel void group_norm_split_apply(__global const T* x, __global const float* part, __global const float* gamma,
                                     __global const float* beta, __global T* y, const int C, const int HW, const int G,
                                     const int S, const float eps, const int apply_silu) {
    const qgrid none = {1.0f, 1.0f, 0, 0, C, 0, 0};
    group_norm_split_chunk(x, part, gamma, beta, y, 0, C, HW, G, S, eps, apply_silu, none);
}

/* GroupNorm (+SiLU) of an int8 bundle whose only readers are integer layers: the same
 * normalisation, stored quantized onto the consumer's input grid, clamp(zp + rint(v / s)), as
 * the consumer would quantize it (OT: char or uchar; a split layer's two grids: channels below
 * `split` on (qs, qz), the rest on (qs2, qz2)); no float tensor is written. */
__kernel void group_norm_q(__global const T* x, __global const float* gamma, __global const float* beta,
                           __global OT* y, const int C, const int HW, const int G, const float eps,
                           const int apply_silu, __local float* lc, __local float* lmean, __local float* lm2,
                           const int split, const float qs, const int qz, const float qs2, const int qz2,
                           const int qlo, const int qhi) {
    const qgrid q = {qs, qs2, qz, qz2, split, qlo, qhi};
    group_norm_wg(x, gamma, beta, 0, y, C, HW, G, eps, apply_silu, lc, lmean, lm2, q);
}

__kernel void group_norm_split_apply_q(__global const T* x, __global const float* part, __global const float* gamma,
                                       __global const float* beta, __global OT* y, const int C, const int HW,
                                       const int G, const int S, const float eps, const int apply_silu,
                                       const int split, const float qs, const int qz, const float qs2, const int qz2,
                                       const int qlo, const int qhi) {
    const qgrid q = {qs, qs2, qz, qz2, split, qlo, qhi};
    group_norm_split_chunk(x, part, gamma, beta, 0, y, C, HW, G, S, eps, apply_silu, q);
}
