/* Integer kernels following the ONNX Runtime convention (docs/architecture.md):
 *   q = clamp(rint(x / s) + zp)                                       (QuantizeLinear)
 *   acc = sum((q_x - zp_x) * q_w) + bias_int32        (int32; weights symmetric per channel)
 *   y = clamp(zp_y + rint((float)acc * mult[m]))        mult = float32(s_x * s_w[m] / s_y)
 * rint() rounds half to even in the default rounding mode, as ORT's nearbyintf does. Built with
 * -cl-fp32-correctly-rounded-divide-sqrt where the device supports it, so that x / s matches the
 * host bit for bit (elsewhere the runtime says it may not).
 * QT is the activation type: char (signed) or uchar (asymmetric uint8); weights are always char. */
#ifndef QT
#define QT char
#endif
#ifndef TS
#define TS 16
#endif
#ifndef QT_SIGNED
#define QT_SIGNED 1
#endif
#ifndef DOT_KHR
#define DOT_KHR 0
#endif
#ifndef DOT_ARM
#define DOT_ARM 0
#endif

__kernel void quantize(__global const float* x, __global QT* q, const int n, const float scale, const int zp,
                       const int qmin, const int qmax) {
    const int i = get_global_id(0);
    if (i < n) q[i] = (QT)clamp(rint(x[i] / scale) + (float)zp, (float)qmin, (float)qmax);
}

__kernel void dequantize(__global const QT* q, __global float* x, const int n, const float scale, const int zp) {
    const int i = get_global_id(0);
    if (i < n) x[i] = (float)((int)q[i] - zp) * scale;
}

/* The tiled int8 implicit GEMM both int8 convolutions share: this work-item's output (m, n)
 * sums w[m, k] * (x_col[k, n] - zp) over input channels [0, split) into *acc1 (zp = zp1) and
 * [split, Cin) into *acc2 (zp = zp2); padding contributes 0. As, Bs: the kernel's local tiles. */
void int8_conv_sums(__local int (*As)[TS + 1], __local int (*Bs)[TS + 1], __global const QT* x, __global const char* w,
                    const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                    const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                    const int split, const int zp1, const int zp2, int* acc1, int* acc2) {
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int n = get_group_id(0) * TS + tx;
    const int m = get_group_id(1) * TS + ty;
    const int b = get_global_id(2);
    const int N = Ho * Wo, KK = KH * KW, K = Cin * KK;
    const int ksplit = split * KK;  /* k index where the second part starts */
    const int oy = n / Wo, ox = n - (n / Wo) * Wo;
    const int iy0 = oy * stride - pad_t, ix0 = ox * stride - pad_l;
    int a1 = 0, a2 = 0;
    for (int k0 = 0; k0 < K; k0 += TS) {
        const int ka = k0 + tx;
        As[ty][tx] = (m < Cout && ka < K) ? (int)w[m * K + ka] : 0;
        const int kb = k0 + ty;
        int bv = 0;
        if (kb < K && n < N) {
            const int ci = kb / KK, r = kb - (kb / KK) * KK;
            const int ky = r / KW, kx = r - (r / KW) * KW;
            const int iy = iy0 + ky, ix = ix0 + kx;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                bv = (int)x[((b * Cin + ci) * H + iy) * W + ix] - (ci < split ? zp1 : zp2);
        }
        Bs[ty][tx] = bv;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TS; ++kk) {
            const int p = As[ty][kk] * Bs[kk][tx];
            if (k0 + kk < ksplit) a1 += p; else a2 += p;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    *acc1 = a1;
    *acc2 = a2;
}

/* Implicit-GEMM int8 convolution (a linear layer / GEMM is the 1x1 case), int32 accumulation,
 * padding contributes q = zp_x, i.e. zero after the zero-point shift. */
__kernel void conv2d_int8(__global const QT* x, __global const char* w, __global const int* bias,
                          __global const float* mult, __global QT* y,
                          const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                          const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                          const int zp_x, const int zp_y, const int qmin, const int qmax) {
    __local int As[TS][TS + 1];
    __local int Bs[TS][TS + 1];
    const int n = get_group_id(0) * TS + get_local_id(0);
    const int m = get_group_id(1) * TS + get_local_id(1);
    const int b = get_global_id(2), N = Ho * Wo;
    int acc = 0, none = 0;  /* one part: every input channel shifted by zp_x */
    int8_conv_sums(As, Bs, x, w, Cin, H, W, Cout, Ho, Wo, KH, KW, stride, pad_t, pad_l, Cin, zp_x, zp_x, &acc, &none);
    if (m < Cout && n < N) {
        acc += bias[m];
        const float v = rint((float)acc * mult[m]) + (float)zp_y;
        y[(b * Cout + m) * N + n] = (QT)clamp(v, (float)qmin, (float)qmax);
    }
}

/* Per-channel-segment quantization of a float NCHW tensor, for int8 bundles: channels
 * [0, split) use (s1, zp1), channels [split, C) use (s2, zp2) (Q-Diffusion's shortcut
 * splitting; split = C when there is one range). */
__kernel void quantize_split(__global const float* x, __global QT* q, const int n, const int C, const int HW,
                             const int split, const float s1, const int zp1, const float s2, const int zp2,
                             const int qmin, const int qmax) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int c = (i / HW) % C;
    const float s = c < split ? s1 : s2;
    const int zp = c < split ? zp1 : zp2;
    q[i] = (QT)clamp(rint(x[i] / s) + (float)zp, (float)qmin, (float)qmax);
}

/* Fake quantization (quantize then dequantize, in float) over up to three channel segments
 * [0, c1), [c1, c2), [c2, C): the attention matmul operands of an int8 bundle, which the
 * simulation quantizes per tensor (q, k, v of a fused QKV buffer; the softmax output). */
__kernel void fake_quant_seg(__global const float* x, __global float* y, const int n, const int C, const int HW,
                             const int c1, const int c2,
                             const float s0, const int z0, const int lo0, const int hi0,
                             const float s1, const int z1, const int lo1, const int hi1,
                             const float s2, const int z2, const int lo2, const int hi2) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int c = (i / HW) % C;
    float s = s0; int z = z0, lo = lo0, hi = hi0;
    if (c >= c2) { s = s2; z = z2; lo = lo2; hi = hi2; }
    else if (c >= c1) { s = s1; z = z1; lo = lo1; hi = hi1; }
    const float q = clamp(rint(x[i] / s) + (float)z, (float)lo, (float)hi);
    y[i] = (q - (float)z) * s;
}

/* Integer convolution with a float epilogue, for layers whose output feeds float ops (the UNet's
 * GroupNorm, residual adds): acc_p = sum over input-channel part p of (q_x - zp_p) * q_w in int32,
 * y = (s_w[m] * (s_1 * acc_1 + s_2 * acc_2) + bias[m] + chan_add[b, m] + res) * out_scale,
 * which is conv(dequant(q_x), dequant(q_w)) computed with exact integer sums. Parts: input
 * channels [0, split) and [split, Cin) (split = Cin: one part). */
__kernel void conv2d_int8_dq(__global const QT* x, __global const char* w, __global const float* w_scale,
                             __global const float* bias, __global const float* chan_add, __global const float* res,
                             __global float* y,
                             const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                             const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                             const int split, const int zp1, const int zp2, const float s1, const float s2,
                             const int flags, const float out_scale) {
    __local int As[TS][TS + 1];
    __local int Bs[TS][TS + 1];
    const int n = get_group_id(0) * TS + get_local_id(0);
    const int m = get_group_id(1) * TS + get_local_id(1);
    const int b = get_global_id(2), N = Ho * Wo;
    int acc1 = 0, acc2 = 0;
    int8_conv_sums(As, Bs, x, w, Cin, H, W, Cout, Ho, Wo, KH, KW, stride, pad_t, pad_l, split, zp1, zp2, &acc1, &acc2);
    if (m < Cout && n < N) {
        float v = w_scale[m] * (s1 * (float)acc1 + s2 * (float)acc2);
        if (flags & 1) v += bias[m];
        if (flags & 2) v += chan_add[b * Cout + m];
        const int yi = (b * Cout + m) * N + n;
        if (flags & 4) v += res[yi];
        y[yi] = v * out_scale;
    }
}

/* The same integer conv with 4-wide packed int8 dot products, no local memory: each work-item
 * one output (m, n); 4 consecutive k of a weight row come in one char4 load, the matching 4
 * input taps are gathered into a QT4, and DOT4 adds their products in int32:
 * cl_khr_integer_dot_product's dot() (any signedness), cl_arm_integer_dot_product_int8's
 * arm_dot() (same signedness only) or, without either extension, the four products spelled
 * out (the variant every device can run and the tests check). Raw values go into the dot,
 * padding reads as the zero point, and the zero-point term is taken off with the weight row
 * sums per part: acc_p = sum(q_x * q_w) - zp_p * wsum[m, p]. */
#if DOT_KHR && defined(__opencl_c_integer_dot_product_input_4x8bit)
#define DOT4(a, b) dot((a), (b))
#elif DOT_ARM && QT_SIGNED
#pragma OPENCL EXTENSION cl_arm_integer_dot_product_int8 : enable
#define DOT4(a, b) arm_dot((a), (b))
#else
#define DOT4(a, b) ((int)(a).x * (b).x + (int)(a).y * (b).y + (int)(a).z * (b).z + (int)(a).w * (b).w)
#endif
#define QT4 CAT4(QT)
#define CAT4(t) CAT4_(t)
#define CAT4_(t) t##4

inline QT tap(__global const QT* x, const int xb, const int k, const int KK, const int KW, const int H, const int W,
              const int iy0, const int ix0, const int zp) {
    const int ci = k / KK, r = k - (k / KK) * KK;
    const int ky = r / KW, kx = r - (r / KW) * KW;
    const int iy = iy0 + ky, ix = ix0 + kx;
    return (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[xb + (ci * H + iy) * W + ix] : (QT)zp;
}

__kernel void conv2d_int8_dq_dot(__global const QT* x, __global const char* w, __global const int* wsum,
                                 __global const float* w_scale, __global const float* bias,
                                 __global const float* chan_add, __global const float* res, __global float* y,
                                 const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                                 const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                                 const int split, const int zp1, const int zp2, const float s1, const float s2,
                                 const int flags, const float out_scale) {
    const int n = get_global_id(0), m = get_global_id(1), b = get_global_id(2);
    const int N = Ho * Wo, KK = KH * KW, K = Cin * KK;
    if (n >= N || m >= Cout) return;
    const int oy = n / Wo, ox = n - (n / Wo) * Wo;
    const int iy0 = oy * stride - pad_t, ix0 = ox * stride - pad_l;
    const int xb = b * Cin * H * W;
    __global const char* wr = w + m * K;
    int accp[2];
    for (int p = 0; p < 2; ++p) {
        const int k_lo = p == 0 ? 0 : split * KK, k_hi = p == 0 ? split * KK : K, zp = p == 0 ? zp1 : zp2;
        int acc = 0, k = k_lo;
        for (; k + 4 <= k_hi; k += 4) {
            const char4 wv = vload4(0, wr + k);
            const QT4 xv = (QT4)(tap(x, xb, k, KK, KW, H, W, iy0, ix0, zp), tap(x, xb, k + 1, KK, KW, H, W, iy0, ix0, zp),
                                 tap(x, xb, k + 2, KK, KW, H, W, iy0, ix0, zp), tap(x, xb, k + 3, KK, KW, H, W, iy0, ix0, zp));
            acc += DOT4(xv, wv);
        }
        for (; k < k_hi; ++k) acc += (int)tap(x, xb, k, KK, KW, H, W, iy0, ix0, zp) * (int)wr[k];
        accp[p] = acc - zp * wsum[2 * m + p];
    }
    float v = w_scale[m] * (s1 * (float)accp[0] + s2 * (float)accp[1]);
    if (flags & 1) v += bias[m];
    if (flags & 2) v += chan_add[b * Cout + m];
    const int yi = (b * Cout + m) * N + n;
    if (flags & 4) v += res[yi];
    y[yi] = v * out_scale;
}
