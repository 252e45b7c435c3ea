/* Integer kernels following DESIGN.md's arithmetic, ONNX Runtime convention:
 *   q = clamp(rint(x / s) + zp)                                       (QuantizeLinear)
 *   acc = sum((q_x - zp_x) * q_w) + bias_int32        (int32; weights symmetric per channel)
 *   y = clamp(zp_y + rint((float)acc * mult[m]))        mult = float32(s_x * s_w[m] / s_y)
 * rint() rounds half to even in the default rounding mode, as ORT's nearbyintf does. Built with
 * -cl-fp32-correctly-rounded-divide-sqrt so that x / s matches the host bit for bit.
 * QT is the activation type: char (signed) or uchar (asymmetric uint8); weights are always char. */
#ifndef QT
#define QT char
#endif
#ifndef TS
#define TS 16
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

/* Implicit-GEMM int8 convolution (a linear layer / GEMM is the 1x1 case), int32 accumulation,
 * padding contributes q = zp_x, i.e. zero after the zero-point shift. */
__kernel void conv2d_int8(__global const QT* x, __global const char* w, __global const int* bias,
                          __global const float* mult, __global QT* y,
                          const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                          const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                          const int zp_x, const int zp_y, const int qmin, const int qmax) {
    __local int As[TS][TS + 1];
    __local int Bs[TS][TS + 1];
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int n = get_group_id(0) * TS + tx;
    const int m = get_group_id(1) * TS + ty;
    const int b = get_global_id(2);
    const int N = Ho * Wo, KK = KH * KW, K = Cin * KK;
    const int oy = n / Wo, ox = n - (n / Wo) * Wo;
    const int iy0 = oy * stride - pad_t, ix0 = ox * stride - pad_l;
    int acc = 0;
    for (int k0 = 0; k0 < K; k0 += TS) {
        const int ka = k0 + tx;
        As[ty][tx] = (m < Cout && ka < K) ? (int)w[m * K + ka] : 0;
        const int kb = k0 + ty;
        int bv = 0;
        if (kb < K && n < N) {
            const int ci = kb / KK, r = kb - (kb / KK) * KK;
            const int ky = r / KW, kx = r - (r / KW) * KW;
            const int iy = iy0 + ky, ix = ix0 + kx;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W) bv = (int)x[((b * Cin + ci) * H + iy) * W + ix] - zp_x;
        }
        Bs[ty][tx] = bv;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TS; ++kk) acc += As[ty][kk] * Bs[kk][tx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (m < Cout && n < N) {
        acc += bias[m];
        const float v = rint((float)acc * mult[m]) + (float)zp_y;
        y[(b * Cout + m) * N + n] = (QT)clamp(v, (float)qmin, (float)qmax);
    }
}
