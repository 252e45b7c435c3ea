/* FlashAttention-style tiled attention (Dao et al. 2022; Chen et al. 2023 for mobile GPUs).
 * Never materialises the N x M score matrix: a work-group of BQ work-items (one query row each)
 * streams K and V in tiles of BKV keys, keeping for each query a running max, a running sum of
 * exponentials and an output accumulator (online softmax).
 *
 * Tensors are channels-first, as the UNet keeps them: element (b, head h, channel j, position n)
 * of q lives at q[b * q_bstride + q_off + (h * HEAD_DIM + j) * N + n] (likewise k, v over M keys,
 * and the output o). So q, k and v may be three slices of one fused QKV projection, and no
 * transpose is ever needed. HEAD_DIM, BKV and DC are compile-time constants (-D).
 *
 * Tiled over head_dim: a work-item accumulates only DC output channels (grid dimension 1 runs
 * over batch x head x ceil(HEAD_DIM / DC) chunks), so its private state is DC + BKV floats
 * instead of 2 x HEAD_DIM + BKV, which spills registers at head_dim 80-160. The price is the
 * Q.K scores being recomputed once per chunk. With DC == HEAD_DIM the query row is kept in
 * registers. LOCAL_TILES: K and V tiles go through local memory (Adreno-class); without it
 * (Mali-class) they are read from global memory through the cache. Products in R, sums in float. */
#ifndef HEAD_DIM
#define HEAD_DIM 32
#endif
#ifndef BKV
#define BKV 16
#endif
#ifndef DC
#define DC HEAD_DIM
#endif

__kernel void flash_attention(__global const T* q, __global const T* k, __global const T* v, __global T* o,
                              const int N, const int M, const int heads,
                              const int q_bstride, const int kv_bstride, const int o_bstride,
                              const int q_off, const int k_off, const int v_off, const float scale,
                              __local R* kt, __local R* vt) {
    const int NCH = (HEAD_DIM + DC - 1) / DC;
    const int qi = get_global_id(0);
    const int z = get_global_id(1);
    const int bh = z / NCH, d0 = (z - (z / NCH) * NCH) * DC;
    const int b = bh / heads, h = bh - (bh / heads) * heads;
    const int lid = get_local_id(0), BQ = get_local_size(0);
    const bool valid = qi < N;
    const int qbase = b * q_bstride + q_off + h * HEAD_DIM * N;
    const int kbase = b * kv_bstride + k_off + h * HEAD_DIM * M;
    const int vbase = b * kv_bstride + v_off + h * HEAD_DIM * M;
    const R rscale = (R)scale;
#if DC == HEAD_DIM
    R qv[HEAD_DIM];
    for (int d = 0; d < HEAD_DIM; ++d) qv[d] = valid ? LDR(q, qbase + d * N + qi) * rscale : (R)0.0f;
#define QV(d) qv[d]
#else
#define QV(d) (LDR(q, qbase + (d) * N + qi) * rscale)
#endif
    ACC acc[DC];
    for (int dd = 0; dd < DC; ++dd) acc[dd] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    float s[BKV];
    for (int kb = 0; kb < M; kb += BKV) {
        const int nk = min(BKV, M - kb);
#if LOCAL_TILES
        /* cooperative tile load; consecutive work-items read consecutive keys (coalesced) */
        for (int e = lid; e < BKV * HEAD_DIM; e += BQ) {
            const int d = e / BKV, jj = e - (e / BKV) * BKV;
            kt[jj * HEAD_DIM + d] = kb + jj < M ? LDR(k, kbase + d * M + kb + jj) : (R)0.0f;
        }
        for (int e = lid; e < BKV * DC; e += BQ) {
            const int dd = e / BKV, jj = e - (e / BKV) * BKV;
            vt[jj * DC + dd] = (kb + jj < M && d0 + dd < HEAD_DIM) ? LDR(v, vbase + (d0 + dd) * M + kb + jj) : (R)0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
#define KT(jj, d) kt[(jj) * HEAD_DIM + (d)]
#define VT(jj, dd) vt[(jj) * DC + (dd)]
#else
#define KT(jj, d) LDR(k, kbase + (d) * M + kb + (jj))
#define VT(jj, dd) (d0 + (dd) < HEAD_DIM ? LDR(v, vbase + (d0 + (dd)) * M + kb + (jj)) : (R)0.0f)
#endif
        if (valid) {
            float mt = m;
            for (int jj = 0; jj < nk; ++jj) {
                float sc = 0.0f;
                for (int d = 0; d < HEAD_DIM; ++d) sc += (float)(QV(d) * KT(jj, d));
                s[jj] = sc;
                mt = fmax(mt, sc);
            }
            const float corr = exp(m - mt);  /* exp(-inf) = 0 on the first tile */
            l *= corr;
            for (int dd = 0; dd < DC; ++dd) acc[dd] *= corr;
            for (int jj = 0; jj < nk; ++jj) {
                const float p = exp(s[jj] - mt);
                l += p;
                for (int dd = 0; dd < DC; ++dd) acc[dd] += p * (float)VT(jj, dd);
            }
            m = mt;
        }
#if LOCAL_TILES
        barrier(CLK_LOCAL_MEM_FENCE);
#endif
    }
    if (valid) {
        const int obase = b * o_bstride + h * HEAD_DIM * N;
        const float inv = 1.0f / l;
        for (int dd = 0; dd < DC && d0 + dd < HEAD_DIM; ++dd) ST(o, obase + (d0 + dd) * N + qi, acc[dd] * inv);
    }
}
