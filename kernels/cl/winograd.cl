/* Winograd F(2x2, 3x3) convolution (Lavin & Gray 2016), stride 1, for 3x3 kernels:
 * Y = A^T [ (G g G^T) .* (B^T d B) ] A over 4x4 input tiles d producing 2x2 outputs, i.e. 16
 * multiplications per 4 outputs instead of 36. The weight transform U = G g G^T is done once
 * on the host at load time; the input transform, the 16 batched GEMMs (gemm_batched, conv.cl)
 * and the output transform (with the same fused epilogue as conv2d) run on the device.
 * Layouts: V[b][e][ci][tile], U[e][co][ci], Mt[b][e][co][tile], e = 4 * row + col of the 4x4 tile. */

__kernel void winograd_input(__global const T* x, __global T* V, const int Cin, const int H, const int W,
                             const int pad, const int tiles_h, const int tiles_w) {
    const int t = get_global_id(0), ci = get_global_id(1), b = get_global_id(2);
    const int nt = tiles_h * tiles_w;
    if (t >= nt) return;
    const int ty = t / tiles_w, tx = t - (t / tiles_w) * tiles_w;
    const int y0 = ty * 2 - pad, x0 = tx * 2 - pad;
    const int xb = (b * Cin + ci) * H * W;
    float d[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const int iy = y0 + i, ix = x0 + j;
            d[i][j] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? LD(x, xb + iy * W + ix) : 0.0f;
        }
    /* B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]] */
    float tmp[4][4];
    for (int j = 0; j < 4; ++j) {
        tmp[0][j] = d[0][j] - d[2][j];
        tmp[1][j] = d[1][j] + d[2][j];
        tmp[2][j] = d[2][j] - d[1][j];
        tmp[3][j] = d[1][j] - d[3][j];
    }
    const int vb = b * 16 * Cin * nt + ci * nt + t;
    for (int i = 0; i < 4; ++i) {
        const float r0 = tmp[i][0] - tmp[i][2], r1 = tmp[i][1] + tmp[i][2];
        const float r2 = tmp[i][2] - tmp[i][1], r3 = tmp[i][1] - tmp[i][3];
        ST(V, vb + (4 * i + 0) * Cin * nt, r0);
        ST(V, vb + (4 * i + 1) * Cin * nt, r1);
        ST(V, vb + (4 * i + 2) * Cin * nt, r2);
        ST(V, vb + (4 * i + 3) * Cin * nt, r3);
    }
}

__kernel void winograd_output(__global const T* Mt, __global const float* bias, __global const T* chan_add,
                              __global const T* res, __global T* y, const int Cout, const int Ho, const int Wo,
                              const int tiles_h, const int tiles_w, const int flags, const float out_scale) {
    const int t = get_global_id(0), co = get_global_id(1), b = get_global_id(2);
    const int nt = tiles_h * tiles_w;
    if (t >= nt) return;
    const int ty = t / tiles_w, tx = t - (t / tiles_w) * tiles_w;
    const int mb = b * 16 * Cout * nt + co * nt + t;
    float mm[4][4];
    for (int e = 0; e < 16; ++e) mm[e / 4][e % 4] = LD(Mt, mb + e * Cout * nt);
    /* A^T = [[1,1,1,0],[0,1,-1,-1]] */
    float tmp[2][4];
    for (int j = 0; j < 4; ++j) {
        tmp[0][j] = mm[0][j] + mm[1][j] + mm[2][j];
        tmp[1][j] = mm[1][j] - mm[2][j] - mm[3][j];
    }
    float add = 0.0f;
    if (flags & 1) add += bias[co];
    if (flags & 2) add += LD(chan_add, b * Cout + co);
    for (int i = 0; i < 2; ++i) {
        const float o0 = tmp[i][0] + tmp[i][1] + tmp[i][2];
        const float o1 = tmp[i][1] - tmp[i][2] - tmp[i][3];
        const int oy = ty * 2 + i;
        if (oy >= Ho) continue;
        for (int j = 0; j < 2; ++j) {
            const int ox = tx * 2 + j;
            if (ox >= Wo) continue;
            const int yi = ((b * Cout + co) * Ho + oy) * Wo + ox;
            float v = (j == 0 ? o0 : o1) + add;
            if (flags & 4) v += LD(res, yi);
            ST(y, yi, v * out_scale);
        }
    }
}
