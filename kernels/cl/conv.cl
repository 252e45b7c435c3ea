/* Convolution as an implicit GEMM (im2col done on the fly while loading the B tile, so the
 * K x N column matrix is never written), and a batched tiled GEMM (Winograd's 16 products,
 * attention's unfused baseline). TS is the square tile edge (-D TS=..., chosen from the device's
 * work-group limits); work-group (TS, TS); each work-item computes one output.
 *
 * conv2d: y[b, m, n] = (sum_k w[m, k] * col[b, k, n] + bias[m] + chan_add[b, m] + res[b, m, n]) * out_scale
 * with M = Cout, N = Ho * Wo, K = Cin * KH * KW; the epilogue carries the UNet's fusions: the
 * bias, the time embedding broadcast over H x W (ResnetBlock2D), the residual and the
 * output scale factor (resnet shortcut, attention residual). A linear layer is a 1x1 conv. */
#ifndef TS
#define TS 16
#endif

__kernel void conv2d(__global const T* x, __global const T* w, __global const float* bias,
                     __global const T* chan_add, __global const T* res, __global T* y,
                     const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                     const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                     const int flags, const float out_scale) {
    __local float As[TS][TS + 1];
    __local float Bs[TS][TS + 1];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int n = get_group_id(0) * TS + tx;   /* output position */
    const int m = get_group_id(1) * TS + ty;   /* output channel */
    const int b = get_global_id(2);
    const int N = Ho * Wo, KK = KH * KW, K = Cin * KK;
    const int xb = b * Cin * H * W;
    /* the output position this work-item loads for the B tile is column tx of the tile */
    const int oy = n / Wo, ox = n - (n / Wo) * Wo;
    const int iy0 = oy * stride - pad_t, ix0 = ox * stride - pad_l;
    const int wrow = (get_group_id(1) * TS + ty) * K;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TS) {
        const int ka = k0 + tx;
        As[ty][tx] = (m < Cout && ka < K) ? LD(w, wrow + ka) : 0.0f;
        const int kb = k0 + ty;
        float bv = 0.0f;
        if (kb < K && n < N) {
            const int ci = kb / KK, r = kb - (kb / KK) * KK;
            const int ky = r / KW, kx = r - (r / KW) * KW;
            const int iy = iy0 + ky, ix = ix0 + kx;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W) bv = LD(x, xb + (ci * H + iy) * W + ix);
        }
        Bs[ty][tx] = bv;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TS; ++kk) acc += As[ty][kk] * Bs[kk][tx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (m < Cout && n < N) {
        if (flags & 1) acc += bias[m];
        if (flags & 2) acc += LD(chan_add, b * Cout + m);
        const int yi = (b * Cout + m) * N + n;
        if (flags & 4) acc += LD(res, yi);
        ST(y, yi, acc * out_scale);
    }
}

/* C[bt] (M x N) = alpha * A[bt % a_mod] (M x K) . B[bt] (K x N), row-major; a_trans / b_trans read
 * A stored K x M / B stored N x K (attention's Q^T K and V P^T without a transpose kernel). */
__kernel void gemm_batched(__global const T* A, __global const T* B, __global T* C,
                           const int M, const int N, const int K, const int a_mod, const int a_trans, const int b_trans,
                           const float alpha) {
    __local float As[TS][TS + 1];
    __local float Bs[TS][TS + 1];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int n = get_group_id(0) * TS + tx;
    const int m = get_group_id(1) * TS + ty;
    const int bt = get_global_id(2);
    const int ab = (bt % a_mod) * M * K, bb = bt * K * N;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TS) {
        const int ka = k0 + tx, kb = k0 + ty;
        As[ty][tx] = (m < M && ka < K) ? (a_trans ? LD(A, ab + ka * M + m) : LD(A, ab + m * K + ka)) : 0.0f;
        float bv = 0.0f;
        if (kb < K && n < N) bv = b_trans ? LD(B, bb + n * K + kb) : LD(B, bb + kb * N + n);
        Bs[ty][tx] = bv;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TS; ++kk) acc += As[ty][kk] * Bs[kk][tx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (m < M && n < N) ST(C, bt * M * N + m * N + n, acc * alpha);
}
