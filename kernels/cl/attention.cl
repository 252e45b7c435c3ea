/* FlashAttention-style tiled attention (Dao et al. 2022; Chen et al. 2023 for mobile GPUs).
 * Never materialises the N x M score matrix: a work-group of BQ work-items (one query row each)
 * streams K and V through local memory in tiles of BKV keys, keeping for each query a running max,
 * a running sum of exponentials and an output accumulator (online softmax).
 *
 * Tensors are channels-first, as the UNet keeps them: element (b, head h, channel j, position n)
 * of q lives at q[b * q_bstride + q_off + (h * HEAD_DIM + j) * N + n] (likewise k, v over M keys,
 * and the output o). So q, k and v may be three slices of one fused QKV projection, and no
 * transpose is ever needed. HEAD_DIM and BKV are compile-time constants (-D), chosen by the host
 * from the device's local memory size. */
#ifndef HEAD_DIM
#define HEAD_DIM 32
#endif
#ifndef BKV
#define BKV 16
#endif

__kernel void flash_attention(__global const T* q, __global const T* k, __global const T* v, __global T* o,
                              const int N, const int M, const int heads,
                              const int q_bstride, const int kv_bstride, const int o_bstride,
                              const int q_off, const int k_off, const int v_off, const float scale,
                              __local float* kt, __local float* vt) {
    const int qi = get_global_id(0);
    const int bh = get_global_id(1);
    const int b = bh / heads, h = bh - (bh / heads) * heads;
    const int lid = get_local_id(0), BQ = get_local_size(0);
    const bool valid = qi < N;
    const int qbase = b * q_bstride + q_off + h * HEAD_DIM * N;
    const int kbase = b * kv_bstride + k_off + h * HEAD_DIM * M;
    const int vbase = b * kv_bstride + v_off + h * HEAD_DIM * M;
    float qv[HEAD_DIM], acc[HEAD_DIM];
    for (int d = 0; d < HEAD_DIM; ++d) {
        qv[d] = valid ? LD(q, qbase + d * N + qi) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    float s[BKV];
    for (int kb = 0; kb < M; kb += BKV) {
        /* cooperative tile load; consecutive work-items read consecutive keys (coalesced) */
        for (int e = lid; e < BKV * HEAD_DIM; e += BQ) {
            const int d = e / BKV, jj = e - (e / BKV) * BKV;
            const int key = kb + jj;
            kt[jj * HEAD_DIM + d] = key < M ? LD(k, kbase + d * M + key) : 0.0f;
            vt[jj * HEAD_DIM + d] = key < M ? LD(v, vbase + d * M + key) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        const int nk = min(BKV, M - kb);
        if (valid) {
            float mt = m;
            for (int jj = 0; jj < nk; ++jj) {
                float sc = 0.0f;
                for (int d = 0; d < HEAD_DIM; ++d) sc += qv[d] * kt[jj * HEAD_DIM + d];
                s[jj] = sc;
                mt = fmax(mt, sc);
            }
            const float corr = exp(m - mt);  /* exp(-inf) = 0 on the first tile */
            l *= corr;
            for (int d = 0; d < HEAD_DIM; ++d) acc[d] *= corr;
            for (int jj = 0; jj < nk; ++jj) {
                const float p = exp(s[jj] - mt);
                l += p;
                for (int d = 0; d < HEAD_DIM; ++d) acc[d] += p * vt[jj * HEAD_DIM + d];
            }
            m = mt;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (valid) {
        const int obase = b * o_bstride + h * HEAD_DIM * N;
        const float inv = 1.0f / l;
        for (int d = 0; d < HEAD_DIM; ++d) ST(o, obase + d * N + qi, acc[d] * inv);
    }
}
