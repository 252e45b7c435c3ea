/* Convolution as an implicit GEMM (im2col done on the fly while loading the B tile, so the
 * K x N column matrix is never written), and a batched GEMM (Winograd's 16 products, attention's
 * unfused baseline). Register-blocked: a work-group of WG x WG work-items computes a BM x BN
 * block (BM = BN = WG * RB), each work-item an RB x RB sub-block strided by WG (so that local
 * reads do not conflict and stores stay coalesced); K advances in steps of TK through local
 * memory. WG, RB and TK are -D constants the host picks from the device's work-group limits and
 * the compiled kernel's CL_KERNEL_WORK_GROUP_SIZE. Tiles hold R (half with HALF_ARITH), sums are float.
 *
 * conv2d: y[b, m, n] = (sum_k w[m, k] * col[b, k, n] + bias[m] + chan_add[b, m] + res[b, m, n]) * out_scale
 * with M = Cout, N = Ho * Wo, K = Cin * KH * KW; the epilogue carries the UNet's fusions: the
 * bias, the time embedding broadcast over H x W (ResnetBlock2D), the residual and the
 * output scale factor (resnet shortcut, attention residual). A linear layer is a 1x1 conv. */
#ifndef WG
#define WG 8
#endif
#ifndef RB
#define RB 4
#endif
#ifndef TK
#define TK 16
#endif
#define BM (WG * RB)
#define BN (WG * RB)

/* conv2d's epilogue for a work-item's RB x RB block, outputs m = m_first + i * m_step and
 * n = n_first + j * n_step (both variants): acc + bias[m] + chan_add[b, m] (flags 1, 2; summed
 * first, as before), + res[b, m, n] (flag 4), times out_scale. */
void conv_epilogue(ACC acc[RB][RB], __global const float* bias, __global const T* chan_add, __global const T* res,
                   __global T* y, const int b, const int Cout, const int N, const int m_first, const int m_step,
                   const int n_first, const int n_step, const int flags, const float out_scale) {
    for (int i = 0; i < RB; ++i) {
        const int m = m_first + i * m_step;
        if (m >= Cout) break;  /* m grows with i: the rest are out of range too */
        float add = 0.0f;
        if (flags & 1) add += bias[m];
        if (flags & 2) add += LD(chan_add, b * Cout + m);
        for (int j = 0; j < RB; ++j) {
            const int n = n_first + j * n_step;
            if (n >= N) break;
            const int yi = (b * Cout + m) * N + n;
            float v = acc[i][j] + add;
            if (flags & 4) v += LD(res, yi);
            ST(y, yi, v * out_scale);
        }
    }
}

#if LOCAL_TILES
/* acc[i][j] += As[kk][ty + i * WG] * Bs[kk][tx + j * WG] over the TK rows of the local tiles */
void tile_product(__local R (*As)[BM], __local R (*Bs)[BN], ACC acc[RB][RB], const int tx, const int ty) {
    for (int kk = 0; kk < TK; ++kk) {
        R a[RB], bv[RB];
        for (int i = 0; i < RB; ++i) a[i] = As[kk][ty + i * WG];
        for (int j = 0; j < RB; ++j) bv[j] = Bs[kk][tx + j * WG];
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < RB; ++j) acc[i][j] += (ACC)(a[i] * bv[j]);
    }
}

__kernel void conv2d(__global const T* x, __global const T* w, __global const float* bias,
                     __global const T* chan_add, __global const T* res, __global T* y,
                     const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                     const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                     const int flags, const float out_scale) {
    __local R As[TK][BM];
    __local R Bs[TK][BN];
    /* im2col index tables, so that the inner loads do no integer division: per output column the
     * top-left input row/col, per k of the current tile the channel offset and the kernel tap */
    __local int n_iy[BN], n_ix[BN];
    __local int k_off[TK], k_y[TK], k_x[TK];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int lid = ty * WG + tx;
    const int n0 = get_group_id(0) * BN, m0 = get_group_id(1) * BM;
    const int b = get_global_id(2);
    const int N = Ho * Wo, KK = KH * KW, K = Cin * KK;
    const int xb = b * Cin * H * W;
    const int FAR = -(1 << 20);  /* an out-of-range marker: any tap added keeps it negative */
    for (int e = lid; e < BN; e += WG * WG) {
        const int n = n0 + e;
        const int oy = n / Wo, ox = n - (n / Wo) * Wo;
        n_iy[e] = n < N ? oy * stride - pad_t : FAR;
        n_ix[e] = ox * stride - pad_l;
    }
    ACC acc[RB][RB];
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = lid; e < TK; e += WG * WG) {
            const int k = k0 + e;
            const int ci = k / KK, r = k - (k / KK) * KK;
            k_off[e] = ci * H * W;
            k_y[e] = k < K ? r / KW : FAR;
            k_x[e] = r - (r / KW) * KW;
        }
        for (int e = lid; e < TK * BM; e += WG * WG) {  /* k fastest: contiguous weight rows */
            const int kk = e % TK, mm = e / TK;
            const int m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < Cout && k < K) ? LDR(w, m * K + k) : (R)0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int e = lid; e < TK * BN; e += WG * WG) {  /* n fastest: neighbouring output pixels */
            const int nn = e % BN, kk = e / BN;
            const int iy = n_iy[nn] + k_y[kk], ix = n_ix[nn] + k_x[kk];
            Bs[kk][nn] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? LDR(x, xb + k_off[kk] + iy * W + ix) : (R)0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        tile_product(As, Bs, acc, tx, ty);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    conv_epilogue(acc, bias, chan_add, res, y, b, Cout, N, m0 + ty, WG, n0 + tx, WG, flags, out_scale);
}

/* C[bt] (M x N) = alpha * A[bt % a_mod] (M x K) . B[bt] (K x N), row-major; a_trans / b_trans read
 * A stored K x M / B stored N x K (attention's Q^T K and V P^T without a transpose kernel). */
__kernel void gemm_batched(__global const T* A, __global const T* B, __global T* C,
                           const int M, const int N, const int K, const int a_mod, const int a_trans, const int b_trans,
                           const float alpha) {
    __local R As[TK][BM];
    __local R Bs[TK][BN];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int lid = ty * WG + tx;
    const int n0 = get_group_id(0) * BN, m0 = get_group_id(1) * BM;
    const int bt = get_global_id(2);
    const int ab = (bt % a_mod) * M * K, bb = bt * K * N;
    ACC acc[RB][RB];
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = lid; e < TK * BM; e += WG * WG) {
            int kk, mm;
            if (a_trans) { mm = e % BM; kk = e / BM; } else { kk = e % TK; mm = e / TK; }
            const int m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < M && k < K) ? (a_trans ? LDR(A, ab + k * M + m) : LDR(A, ab + m * K + k)) : (R)0.0f;
        }
        for (int e = lid; e < TK * BN; e += WG * WG) {
            int kk, nn;
            if (b_trans) { kk = e % TK; nn = e / TK; } else { nn = e % BN; kk = e / BN; }
            const int n = n0 + nn, k = k0 + kk;
            Bs[kk][nn] = (k < K && n < N) ? (b_trans ? LDR(B, bb + n * K + k) : LDR(B, bb + k * N + n)) : (R)0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        tile_product(As, Bs, acc, tx, ty);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int i = 0; i < RB; ++i) {
        const int m = m0 + ty + i * WG;
        if (m >= M) continue;
        for (int j = 0; j < RB; ++j) {
            const int n = n0 + tx + j * WG;
            if (n < N) ST(C, bt * M * N + m * N + n, acc[i][j] * alpha);
        }
    }
}
#else
/* No-local-memory variant (Mali-class devices, whose "local" memory is main memory): the same
 * register blocking, operands read straight from global memory through the cache. Each
 * work-item computes RB output channels x RB consecutive output positions. */
__kernel void conv2d(__global const T* x, __global const T* w, __global const float* bias,
                     __global const T* chan_add, __global const T* res, __global T* y,
                     const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                     const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                     const int flags, const float out_scale) {
    const int n0 = get_global_id(0) * RB, m0 = get_global_id(1) * RB, b = get_global_id(2);
    const int N = Ho * Wo, KK = KH * KW, K = Cin * KK;
    if (n0 >= N || m0 >= Cout) return;
    int iy0[RB], ix0[RB];
    for (int j = 0; j < RB; ++j) {
        const int n = min(n0 + j, N - 1);  /* clamped: duplicates are computed, not stored */
        const int oy = n / Wo;
        iy0[j] = oy * stride - pad_t;
        ix0[j] = (n - oy * Wo) * stride - pad_l;
    }
    ACC acc[RB][RB];
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = 0.0f;
    const int xb = b * Cin * H * W;
    for (int ci = 0; ci < Cin; ++ci)
        for (int ky = 0; ky < KH; ++ky)
            for (int kx = 0; kx < KW; ++kx) {
                const int k = (ci * KH + ky) * KW + kx;
                R a[RB], bv[RB];
                for (int i = 0; i < RB; ++i) a[i] = m0 + i < Cout ? LDR(w, (m0 + i) * K + k) : (R)0.0f;
                for (int j = 0; j < RB; ++j) {
                    const int iy = iy0[j] + ky, ix = ix0[j] + kx;
                    bv[j] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? LDR(x, xb + ci * H * W + iy * W + ix) : (R)0.0f;
                }
                for (int i = 0; i < RB; ++i)
                    for (int j = 0; j < RB; ++j) acc[i][j] += (ACC)(a[i] * bv[j]);
            }
    conv_epilogue(acc, bias, chan_add, res, y, b, Cout, N, m0, 1, n0, 1, flags, out_scale);
}

__kernel void gemm_batched(__global const T* A, __global const T* B, __global T* C,
                           const int M, const int N, const int K, const int a_mod, const int a_trans, const int b_trans,
                           const float alpha) {
    const int n0 = get_global_id(0) * RB, m0 = get_global_id(1) * RB, bt = get_global_id(2);
    if (n0 >= N || m0 >= M) return;
    const int ab = (bt % a_mod) * M * K, bb = bt * K * N;
    ACC acc[RB][RB];
    for (int i = 0; i < RB; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = 0.0f;
    for (int k = 0; k < K; ++k) {
        R a[RB], bv[RB];
        for (int i = 0; i < RB; ++i) {
            const int m = min(m0 + i, M - 1);
            a[i] = a_trans ? LDR(A, ab + k * M + m) : LDR(A, ab + m * K + k);
        }
        for (int j = 0; j < RB; ++j) {
            const int n = min(n0 + j, N - 1);
            bv[j] = b_trans ? LDR(B, bb + n * K + k) : LDR(B, bb + k * N + n);
        }
        for (int i = 0; i < RB; ++i)
            for (int j = 0; j < RB; ++j) acc[i][j] += (ACC)(a[i] * bv[j]);
    }
    for (int i = 0; i < RB && m0 + i < M; ++i)
        for (int j = 0; j < RB && n0 + j < N; ++j) ST(C, bt * M * N + (m0 + i) * N + n0 + j, acc[i][j] * alpha);
}
#endif
