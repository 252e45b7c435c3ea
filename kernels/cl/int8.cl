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

/* Output (m, n) of image b: acc[p] = sum over input-channel part p of (q_x - zp_p) * q_w, four
 * taps per packed dot product, the zero-point term taken off with the weight row sums. */
void dot_sums(__global const QT* x, __global const char* w, __global const int* wsum, const int n, const int m,
              const int b, const int Cin, const int H, const int W, const int Wo, const int KH, const int KW,
              const int stride, const int pad_t, const int pad_l, const int split, const int zp1, const int zp2,
              int* accp) {
    const int KK = KH * KW, K = Cin * KK;
    const int oy = n / Wo, ox = n - (n / Wo) * Wo;
    const int iy0 = oy * stride - pad_t, ix0 = ox * stride - pad_l;
    const int xb = b * Cin * H * W;
    __global const char* wr = w + m * K;
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
}

__kernel void conv2d_int8_dq_dot(__global const QT* x, __global const char* w, __global const int* wsum,
                                 __global const float* w_scale, __global const float* bias,
                                 __global const float* chan_add, __global const float* res, __global float* y,
                                 const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo,
                                 const int KH, const int KW, const int stride, const int pad_t, const int pad_l,
                                 const int split, const int zp1, const int zp2, const float s1, const float s2,
                                 const int flags, const float out_scale) {
    const int n = get_global_id(0), m = get_global_id(1), b = get_global_id(2);
    if (n >= Ho * Wo || m >= Cout) return;
    int accp[2];
    dot_sums(x, w, wsum, n, m, b, Cin, H, W, Wo, KH, KW, stride, pad_t, pad_l, split, zp1, zp2, accp);
    float v = w_scale[m] * (s1 * (float)accp[0] + s2 * (float)accp[1]);
    if (flags & 1) v += bias[m];
    if (flags & 2) v += chan_add[b * Cout + m];
    const int yi = (b * Cout + m) * (Ho * Wo) + n;
    if (flags & 4) v += res[yi];
    y[yi] = v * out_scale;
}

/* ------------------------------------------------------------------------------------------
 * Lowered int8 layers (edgediff.lowering): int8 kept between integer layers.
 * An integer layer has one or two parts (input channels [0, split) and [split, Cin)); part p
 * accumulates acc_p = sum((q_x - zp_p) * q_w) (+ the int32 bias in part 0), then either
 * requantizes onto its output grid, r_p = (clamp(zo_p + rint(acc_p * mult_p[m])) - zo_p) * so_p,
 * or stays float, r_p = acc_p * acc_scale_p[m] (the model's last layer). That is the PyTorch
 * simulation's float32 arithmetic step for step, so a part's integers match
 * edgediff.lowering.run_part bit for bit. v = (r_1 + r_2 + chan_add + res) * out_scale is then
 * stored as float (a float op consumes it) or quantized onto the consumer's input grid
 * (ss, sz: clamp(sz + rint(v / ss))) when integer layers are its only readers. DIRECT (one
 * part, nothing added, consumer grid = the part's output grid): the requantized integer itself.
 * OUT_Q selects the output type: OT (int8/uint8) or float. */
#ifndef OUT_Q
#define OUT_Q 0
#endif
#ifndef OT
#define OT char
#endif
#if OUT_Q
#define YT OT
#else
#define YT float
#endif

inline float part_value(const int acc, const float mult, const float acc_scale, const int rq, const int zo,
                        const int omin, const int omax, const float so) {
    if (rq) return (clamp(rint((float)acc * mult) + (float)zo, (float)omin, (float)omax) - (float)zo) * so;
    return (float)acc * acc_scale;
}

/* flags: 1 bias, 2 chan_add, 4 res, 8 part 1 requantizes, 16 part 2 requantizes, 32 two parts, 64 DIRECT */
inline void lowered_store(__global YT* y, const int yi, const int m, const int b, const int Cout, int acc1, const int acc2,
                          __global const int* bias, __global const float* mult1, __global const float* ascale1,
                          __global const float* mult2, __global const float* ascale2,
                          __global const float* chan_add, __global const float* res, const int flags,
                          const int zo1, const int omin1, const int omax1, const float so1,
                          const int zo2, const int omin2, const int omax2, const float so2,
                          const float out_scale, const float ss, const int sz, const int smin, const int smax) {
    if (flags & 1) acc1 += bias[m];
#if OUT_Q
    if (flags & 64) {
        y[yi] = (OT)clamp(rint((float)acc1 * mult1[m]) + (float)zo1, (float)omin1, (float)omax1);
        return;
    }
#endif
    float v = part_value(acc1, (flags & 8) ? mult1[m] : 0.0f, ascale1[m], flags & 8, zo1, omin1, omax1, so1);
    if (flags & 32) v += part_value(acc2, (flags & 16) ? mult2[m] : 0.0f, ascale2[m], flags & 16, zo2, omin2, omax2, so2);
    if (flags & 2) v += chan_add[b * Cout + m];
    if (flags & 4) v = res[yi] + v;
    if (out_scale != 1.0f) v *= out_scale;
#if OUT_Q
    y[yi] = (OT)clamp(rint(v / ss) + (float)sz, (float)smin, (float)smax);
#else
    y[yi] = v;
#endif
}

#define LOWERED_ARGS __global const int* bias, __global const float* mult1, __global const float* ascale1, \
    __global const float* mult2, __global const float* ascale2, __global const float* chan_add, \
    __global const float* res, __global YT* y, \
    const int Cin, const int H, const int W, const int Cout, const int Ho, const int Wo, \
    const int KH, const int KW, const int stride, const int pad_t, const int pad_l, \
    const int split, const int zp1, const int zp2, const int flags, \
    const int zo1, const int omin1, const int omax1, const float so1, \
    const int zo2, const int omin2, const int omax2, const float so2, \
    const float out_scale, const float ss, const int sz, const int smin, const int smax
#define LOWERED_STORE(acc1, acc2) lowered_store(y, (b * Cout + m) * (Ho * Wo) + n, m, b, Cout, (acc1), (acc2), bias, \
    mult1, ascale1, mult2, ascale2, chan_add, res, flags, zo1, omin1, omax1, so1, zo2, omin2, omax2, so2, out_scale, \
    ss, sz, smin, smax)

/* Tiled (local-memory) form: the same int8_conv_sums as conv2d_int8. */
__kernel void conv2d_int8_lowered(__global const QT* x, __global const char* w, LOWERED_ARGS) {
    __local int As[TS][TS + 1];
    __local int Bs[TS][TS + 1];
    const int n = get_group_id(0) * TS + get_local_id(0);
    const int m = get_group_id(1) * TS + get_local_id(1);
    const int b = get_global_id(2);
    int acc1 = 0, acc2 = 0;
    int8_conv_sums(As, Bs, x, w, Cin, H, W, Cout, Ho, Wo, KH, KW, stride, pad_t, pad_l, split, zp1, zp2, &acc1, &acc2);
    if (m < Cout && n < Ho * Wo) LOWERED_STORE(acc1, acc2);
}

/* No-local-memory form with 4-wide packed dot products (see conv2d_int8_dq_dot). */
__kernel void conv2d_int8_lowered_dot(__global const QT* x, __global const char* w, __global const int* wsum,
                                      LOWERED_ARGS) {
    const int n = get_global_id(0), m = get_global_id(1), b = get_global_id(2);
    if (n >= Ho * Wo || m >= Cout) return;
    int accp[2];
    dot_sums(x, w, wsum, n, m, b, Cin, H, W, Wo, KH, KW, stride, pad_t, pad_l, split, zp1, zp2, accp);
    LOWERED_STORE(accp[0], accp[1]);
}

/* Integer attention of a lowered model: Q, K, V int8 (symmetric grids, channels-first
 * (B, heads * HEAD_DIM, tokens) at q_off/k_off/v_off with batch strides), one work-item per
 * (query, head, batch). Logits = float(int32 Q.K) * qk_scale * scale (the simulation's order),
 * softmax in float (max, then sum of exponentials, then each probability: three passes over
 * the keys, logits recomputed, so no N x M matrix), P quantized onto its [0, 1] grid
 * (sp, zpp, pmax), int32 P.V accumulators, then requantized with av_mult onto to_out's input
 * grid (rq; DIRECT stores that integer) or float acc * (s_p * s_v), and stored as in
 * lowered_store. Softmax exponentials may differ from PyTorch's in the last bit, so a P value
 * on a rounding boundary can land one step apart. */
#ifndef HEAD_DIM
#define HEAD_DIM 8
#endif
__kernel void attention_int8(__global const char* q, __global const char* k, __global const char* v, __global YT* y,
                             const int heads, const int n, const int m, const int q_off, const int k_off,
                             const int v_off, const int q_bs, const int kv_bs,
                             const int zq, const int zk, const int zv, const float qk_scale, const float scale,
                             const float sp, const int zpp, const int pmax, const float pv_scale,
                             const int rq, const float av_mult, const int zo, const int omin, const int omax,
                             const float so, const int direct, const float ss, const int sz, const int smin,
                             const int smax) {
    const int i = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    if (i >= n) return;
    int qi[HEAD_DIM];
    const int qb = b * q_bs + q_off + h * HEAD_DIM * n;
    const int kb = b * kv_bs + k_off + h * HEAD_DIM * m, vb = b * kv_bs + v_off + h * HEAD_DIM * m;
    for (int c = 0; c < HEAD_DIM; ++c) qi[c] = (int)q[qb + c * n + i] - zq;
    float mx = -INFINITY;
    for (int j = 0; j < m; ++j) {
        int a = 0;
        for (int c = 0; c < HEAD_DIM; ++c) a += qi[c] * ((int)k[kb + c * m + j] - zk);
        mx = fmax(mx, (float)a * qk_scale * scale);
    }
    float sum = 0.0f;
    for (int j = 0; j < m; ++j) {
        int a = 0;
        for (int c = 0; c < HEAD_DIM; ++c) a += qi[c] * ((int)k[kb + c * m + j] - zk);
        sum += exp((float)a * qk_scale * scale - mx);
    }
    int acc[HEAD_DIM];
    for (int c = 0; c < HEAD_DIM; ++c) acc[c] = 0;
    for (int j = 0; j < m; ++j) {
        int a = 0;
        for (int c = 0; c < HEAD_DIM; ++c) a += qi[c] * ((int)k[kb + c * m + j] - zk);
        const float p = exp((float)a * qk_scale * scale - mx) / sum;
        const int pq = (int)clamp(rint(p / sp) + (float)zpp, 0.0f, (float)pmax) - zpp;
        if (pq != 0)
            for (int c = 0; c < HEAD_DIM; ++c) acc[c] += pq * ((int)v[vb + c * m + j] - zv);
    }
    const int C = heads * HEAD_DIM;
    for (int c = 0; c < HEAD_DIM; ++c) {
        const int yi = (b * C + h * HEAD_DIM + c) * n + i;
#if OUT_Q
        if (direct) {
            y[yi] = (OT)clamp(rint((float)acc[c] * av_mult) + (float)zo, (float)omin, (float)omax);
            continue;
        }
#endif
        const float val = part_value(acc[c], av_mult, pv_scale, rq, zo, omin, omax, so);
#if OUT_Q
        y[yi] = (OT)clamp(rint(val / ss) + (float)sz, (float)smin, (float)smax);
#else
        y[yi] = val;
#endif
    }
}
