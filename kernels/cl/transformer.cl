/* Transformer-block ops of conditional denoisers (UNet2DConditionModel's BasicTransformerBlock,
 * DiT), in the runtime's channels-first layout: a token sequence is (B, C, N), position n of
 * channel c at x[(b * C + c) * N + n], so a Linear over tokens is a 1x1 convolution and no
 * transpose is ever needed. No local memory (the same code suits Adreno- and Mali-class
 * devices); one work-item per position or per element. Statistics in float (ACC). */

/* LayerNorm over the channels of each position: work-item (b, n) walks its C values with
 * stride N (consecutive work-items read consecutive addresses, so the walk is coalesced),
 * Welford in one pass, then writes (x - mean) * rstd [* gamma[c] + beta[c]] (flags & 1)
 * [* (1 + mod[b, scale_off + c]) + mod[b, shift_off + c]] (flags & 2: adaLN modulation, DiT;
 * mod is a (B, mod_stride) vector such as the chunked output of adaLN's linear). */
#ifndef OT
#define OT char
#endif
/* One position's LayerNorm over its C channels (stride N); stored as T into y or (yq not null)
 * quantized onto (qs, qz, qlo, qhi) into yq: int8 bundles, when one integer layer reads it. */
void layer_norm_position(__global const T* x, __global const float* gamma, __global const float* beta,
                         __global const T* mod, __global T* y, __global OT* yq, const int C, const int N, const int i,
                         const float eps, const int flags, const int mod_stride, const int scale_off,
                         const int shift_off, const float qs, const int qz, const int qlo, const int qhi) {
    const int b = i / N, n = i - (i / N) * N;
    const int base = b * C * N + n;
    ACC cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (int c = 0; c < C; ++c) {
        const float v = LD(x, base + c * N);
        cnt += 1.0f;
        const float d = v - mean;
        mean += d / cnt;
        m2 += d * (v - mean);
    }
    const float rstd = 1.0f / sqrt(m2 / cnt + eps);
    const int mb = b * mod_stride;
    for (int c = 0; c < C; ++c) {
        float v = (LD(x, base + c * N) - mean) * rstd;
        if (flags & 1) v = v * gamma[c] + beta[c];
        if (flags & 2) v = v * (1.0f + LD(mod, mb + scale_off + c)) + LD(mod, mb + shift_off + c);
        if (yq) yq[base + c * N] = (OT)clamp(rint(v / qs) + (float)qz, (float)qlo, (float)qhi);
        else ST(y, base + c * N, v);
    }
}

__kernel void layer_norm_channels(__global const T* x, __global const float* gamma, __global const float* beta,
                                  __global const T* mod, __global T* y, const int C, const int N, const int BN,
                                  const float eps, const int flags, const int mod_stride, const int scale_off,
                                  const int shift_off) {
    const int i = get_global_id(0);
    if (i < BN)
        layer_norm_position(x, gamma, beta, mod, y, 0, C, N, i, eps, flags, mod_stride, scale_off, shift_off, 1.0f,
                            0, 0, 0);
}

__kernel void layer_norm_channels_q(__global const T* x, __global const float* gamma, __global const float* beta,
                                    __global const T* mod, __global OT* y, const int C, const int N, const int BN,
                                    const float eps, const int flags, const int mod_stride, const int scale_off,
                                    const int shift_off, const float qs, const int qz, const int qlo, const int qhi) {
    const int i = get_global_id(0);
    if (i < BN)
        layer_norm_position(x, gamma, beta, mod, 0, y, C, N, i, eps, flags, mod_stride, scale_off, shift_off, qs, qz,
                            qlo, qhi);
}

/* GEGLU (SD-1.x feed-forward): x is the (B, 2F, N) output of the proj linear; the first F
 * channels are the value, the last F the gate: y[b, j, n] = x[b, j, n] * gelu(x[b, F + j, n]),
 * exact (erf) GELU as diffusers' GEGLU. */
inline float geglu_value(__global const T* x, const int FN, const int i) {
    const int b = i / FN, r = i - (i / FN) * FN;
    const float a = LD(x, 2 * b * FN + r), g = LD(x, 2 * b * FN + FN + r);
    return a * 0.5f * g * (1.0f + erf(g * 0.7071067811865476f));
}

__kernel void geglu(__global const T* x, __global T* y, const int FN, const int n) {
    const int i = get_global_id(0);
    if (i < n) ST(y, i, geglu_value(x, FN, i));
}

/* GEGLU stored on the next integer layer's grid (int8 bundles). */
__kernel void geglu_q(__global const T* x, __global OT* y, const int FN, const int n, const float qs, const int qz,
                      const int qlo, const int qhi) {
    const int i = get_global_id(0);
    if (i < n) y[i] = (OT)clamp(rint(geglu_value(x, FN, i) / qs) + (float)qz, (float)qlo, (float)qhi);
}

/* adaLN-Zero's gated residual (DiT): y = res + mod[b, off + c] * x over (B, C, N). */
__kernel void gate_residual(__global const T* x, __global const T* res, __global const T* mod, __global T* y,
                            const int C, const int N, const int mod_stride, const int off, const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int b = i / (C * N), c = (i / N) - (i / (C * N)) * C;
    ST(y, i, LD(res, i) + LD(mod, b * mod_stride + off + c) * LD(x, i));
}

/* y = x + p, p one (C, N) tensor broadcast over the batch (DiT's fixed positional embedding). */
__kernel void add_broadcast(__global const T* x, __global const T* p, __global T* y, const int per, const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    ST(y, i, LD(x, i) + LD(p, i - (i / per) * per));
}

/* Embedding-table rows (DiT's class labels): y[b, j] = table[labels[b], j]; the host checks labels. */
__kernel void embedding_rows(__global const int* labels, __global const T* table, __global T* y, const int D,
                             const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int b = i / D, j = i - (i / D) * D;
    ST(y, i, LD(table, labels[b] * D + j));
}

/* DiT's unpatchify: x (B, P*P*Co, h, w), feature f = (pi * P + qi) * Co + c, to
 * y (B, Co, h*P, w*P) with y[b, c, hh*P + pi, ww*P + qi] = x[b, f, hh, ww]. */
__kernel void unpatchify(__global const T* x, __global T* y, const int P, const int Co, const int h, const int w,
                         const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int W2 = w * P, H2 = h * P;
    const int b = i / (Co * H2 * W2);
    int r = i - b * Co * H2 * W2;
    const int c = r / (H2 * W2);
    r -= c * H2 * W2;
    const int yy = r / W2, xx = r - (r / W2) * W2;
    const int hh = yy / P, pi = yy - (yy / P) * P, ww = xx / P, qi = xx - (xx / P) * P;
    const int f = (pi * P + qi) * Co + c;
    ST(y, i, LD(x, ((b * P * P * Co + f) * h + hh) * w + ww));
}
