/* Elementwise, resampling and embedding ops of a UNet. One work-item per output element. */

/* silu, gelu, add, affine: each work-item handles VEC consecutive elements with one 128-bit
 * vector load/store (vload4/vload8, or vload_half4 for half storage without cl_khr_fp16) in
 * R arithmetic; the last work-item finishes the n % VEC tail with scalar accesses. */
#define VEC_LOOP(SCALAR_BODY, VECTOR_BODY)                          \
    const int i = get_global_id(0);                                 \
    if ((i + 1) * VEC <= n) { VECTOR_BODY; }                        \
    else for (int j = i * VEC; j < n; ++j) { SCALAR_BODY; }

__kernel void silu(__global const T* x, __global T* y, const int n) {
    VEC_LOOP(ST(y, j, silu_f(LD(x, j))),
             const VR v = VLD(i, x); VST(v / ((R)1.0f + exp(-v)), i, y))
}

/* exact (erf) GELU, as torch.nn.functional.gelu(approximate="none") */
__kernel void gelu(__global const T* x, __global T* y, const int n) {
    VEC_LOOP(const float v = LD(x, j); ST(y, j, 0.5f * v * (1.0f + erf(v * 0.7071067811865476f))),
             const VR v = VLD(i, x); VST((R)0.5f * v * ((R)1.0f + erf(v * (R)0.7071067811865476f)), i, y))
}

/* tanh-approximated GELU, as torch.nn.functional.gelu(approximate="tanh") (DiT's feed-forward) */
__kernel void gelu_tanh(__global const T* x, __global T* y, const int n) {
    VEC_LOOP(const float v = LD(x, j); ST(y, j, 0.5f * v * (1.0f + tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)))),
             const VR v = VLD(i, x);
             VST((R)0.5f * v * ((R)1.0f + tanh((R)0.7978845608028654f * (v + (R)0.044715f * v * v * v))), i, y))
}

/* y = (a + b) * scale */
__kernel void add(__global const T* a, __global const T* b, __global T* y, const int n, const float scale) {
    VEC_LOOP(ST(y, j, (LD(a, j) + LD(b, j)) * scale),
             VST((VLD(i, a) + VLD(i, b)) * (R)scale, i, y))
}

/* y = a * alpha + beta (the UNet's centre_input_sample: 2x - 1) */
__kernel void affine(__global const T* a, __global T* y, const int n, const float alpha, const float beta) {
    VEC_LOOP(ST(y, j, LD(a, j) * alpha + beta),
             VST(VLD(i, a) * (R)alpha + (R)beta, i, y))
}

/* channel concat of NCHW tensors: y = cat([a (B,ca,HW), b (B,cb,HW)], dim=1) */
/* Element i of the channel concat of a (B, ca, hw) and b (B, cb, hw); *c_out: its channel. */
inline float concat_value(__global const T* a, __global const T* b, const int ca, const int cb, const int hw,
                          const int i, int* c_out) {
    const int c_all = ca + cb;
    const int bi = i / (c_all * hw);
    const int r = i - bi * c_all * hw;
    const int c = r / hw;
    const int p = r - c * hw;
    *c_out = c;
    return c < ca ? LD(a, (bi * ca + c) * hw + p) : LD(b, (bi * cb + (c - ca)) * hw + p);
}

__kernel void concat_channels(__global const T* a, __global const T* b, __global T* y,
                              const int ca, const int cb, const int hw, const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    int c;
    ST(y, i, concat_value(a, b, ca, cb, hw, i, &c));
}

/* The concat of an int8 bundle read only by an integer layer: stored on that layer's grid(s)
 * (channels below `split` on (s1, z1), the rest on (s2, z2): a shortcut-split layer's halves). */
#ifndef OT
#define OT char
#endif
__kernel void concat_channels_q(__global const T* a, __global const T* b, __global OT* y,
                                const int ca, const int cb, const int hw, const int n, const int split,
                                const float s1, const int z1, const float s2, const int z2, const int lo, const int hi) {
    const int i = get_global_id(0);
    if (i >= n) return;
    int c;
    const float v = concat_value(a, b, ca, cb, hw, i, &c);
    const float s = c < split ? s1 : s2;
    y[i] = (OT)clamp(rint(v / s) + (float)(c < split ? z1 : z2), (float)lo, (float)hi);
}

/* nearest-neighbour 2x upsampling of NCHW: (BC, H, W) -> (BC, 2H, 2W) */
__kernel void upsample_nearest2x(__global const T* x, __global T* y, const int H, const int W, const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int W2 = 2 * W, H2 = 2 * H;
    const int bc = i / (H2 * W2);
    const int r = i - bc * H2 * W2;
    const int oy = r / W2, ox = r - (r / W2) * W2;
    ST(y, i, LD(x, (bc * H + oy / 2) * W + ox / 2));
}

/* sinusoidal timestep embedding (diffusers get_timestep_embedding): y[b] = [sin(t f), cos(t f)],
 * halves swapped when flip. freqs are computed on the host in float32 exactly as PyTorch does. */
__kernel void timestep_embedding(__global const float* t, __global const float* freqs, __global T* y,
                                 const int half_dim, const int dim, const int flip, const int n) {
    const int i = get_global_id(0);
    if (i >= n) return;
    const int b = i / dim;
    const int j = i - b * dim;
    float v = 0.0f;  /* odd dim: the last column is zero padding */
    if (j < 2 * half_dim) {
        int jj = j;
        if (flip) jj = j < half_dim ? j + half_dim : j - half_dim;
        const float arg = t[b] * freqs[jj < half_dim ? jj : jj - half_dim];
        v = jj < half_dim ? sin(arg) : cos(arg);
    }
    ST(y, i, v);
}
