// The host side of the array (C-simulation only): file readers, the operand packing into the design's memory
// layouts (systolic.h) and the unpacking of its outputs. tb.cpp (one layer at a time) and call_tb.cpp (a whole
// denoiser call) both drive systolic_top through run_array_layer.
#ifndef EDGEDIFF_HOST_H
#define EDGEDIFF_HOST_H

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "systolic.h"

static bool read_bin(const std::string &path, std::vector<char> &buf) {
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) return false;
    std::fseek(f, 0, SEEK_END);
    long n = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    buf.resize(n > 0 ? n : 0);
    bool ok = n <= 0 || std::fread(buf.data(), 1, n, f) == (size_t)n;
    std::fclose(f);
    return ok;
}

static bool read_cfg(const std::string &path, std::map<std::string, long long> &kv) {
    FILE *f = std::fopen(path.c_str(), "r");
    if (!f) return false;
    char key[64];
    long long val;
    while (std::fscanf(f, "%63s %lld", key, &val) == 2) kv[key] = val;
    std::fclose(f);
    return true;
}

static LayerCfg layer_cfg(std::map<std::string, long long> &kv) {
    LayerCfg c;
    std::memset(&c, 0, sizeof c);
#define GET(f) c.f = (int)kv[#f]
    GET(kind); GET(n); GET(c); GET(h); GET(w); GET(o); GET(kh); GET(kw); GET(sh); GET(sw); GET(pt); GET(pl);
    GET(pb); GET(pr); GET(dh); GET(dw); GET(groups); GET(ho); GET(wo); GET(M); GET(K); GET(N); GET(reps);
    GET(zp_a); GET(zp_b); GET(a_signed); GET(b_signed); GET(has_bias); GET(requant); GET(out_zp); GET(qmin);
    GET(qmax); GET(per_channel);
#undef GET
    return c;
}

static void set_byte(word_t &wd, int lane, int v) { wd(8 * lane + 7, 8 * lane) = (ap_uint<8>)(v & 0xff); }

static word_t splat_tb(int v) {
    word_t wd = 0;
    for (int l = 0; l < VEC; l++) set_byte(wd, l, v);
    return wd;
}

// rows x cols int32 matrix (row-major, `src` + offset) -> rows x ceil(cols/16) words, padded with `pad`
static void pack_rows(const int32_t *src, long rows, long cols, long row_stride, long col_stride, int pad,
                      std::vector<word_t> &out) {
    const long cw = (cols + VEC - 1) / VEC;
    for (long r = 0; r < rows; r++)
        for (long w = 0; w < cw; w++) {
            word_t wd = splat_tb(pad);
            for (int l = 0; l < VEC; l++) {
                const long c = w * VEC + l;
                if (c < cols) set_byte(wd, l, src[r * row_stride + c * col_stride]);
            }
            out.push_back(wd);
        }
}

// One layer on the array: pack x (the A operand) and b (weights, or the B operand of a matmul), bias and
// multipliers (any may be null when unused), run systolic_top, unpack every output into `got` in the layout
// fpga/sim.py uses (conv: N x O x Ho x Wo, gemm: M x N, matmul: reps x M x N), `n_out` values. Returns the
// number of outputs the design wrote (n_out when complete), or -1 when the design refuses the layer.
typedef int (*array_top_t)(LayerCfg, const word_t *, const word_t *, const word_t *, word_t *);

static long run_array_layer(const LayerCfg &c, const int32_t *x, const int32_t *b, const int32_t *bias, const float *mf,
                            const int32_t *mq, const int32_t *sh, size_t n_out, std::vector<int32_t> &got,
                            array_top_t top = systolic_top) {
    const bool conv = c.kind == KIND_CONV;
    const int groups = conv ? c.groups : 1;
    const int nrep = conv ? c.n * groups : c.reps;
    const int ntiles = (c.N + COLS - 1) / COLS;
    std::vector<word_t> xp, bp, pp;
    if (conv) {
        const int cg = c.c / c.groups;
        for (int img = 0; img < c.n; img++)
            for (int g = 0; g < groups; g++)  // [img][g][h][w][channel words]
                pack_rows(x + ((long)img * c.c + (long)g * cg) * c.h * c.w, (long)c.h * c.w, cg, 1, (long)c.h * c.w,
                          c.zp_a, xp);
        const int K = cg * c.kh * c.kw;
        for (int o = 0; o < c.o; o++)  // [O][taps][channel words], K walked as (ki, kj, c)
            for (int t = 0; t < c.kh * c.kw; t++) pack_rows(b + (long)o * K + t, 1, cg, 0, (long)c.kh * c.kw, 0, bp);
    } else if (c.kind == KIND_GEMM) {
        pack_rows(x, c.M, c.K, c.K, 1, c.zp_a, xp);
        pack_rows(b, c.N, c.K, 1, c.N, 0, bp);  // W^T: [N][K words]
    } else {
        for (int r = 0; r < c.reps; r++) {
            pack_rows(x + (long)r * c.M * c.K, c.M, c.K, c.K, 1, c.zp_a, xp);
            pack_rows(b + (long)r * c.K * c.N, c.N, c.K, 1, c.N, c.zp_b, bp);
        }
    }
    for (int g = 0; g < groups; g++)
        for (int t = 0; t < ntiles; t++)
            for (int j = 0; j < COLS; j++) {
                const int n = t * COLS + j;
                const long ch = (long)g * c.N + n;
                word_t wd = 0;
                if (n < c.N) {
                    const long mi = c.per_channel ? ch : 0;
                    uint32_t bits = 0;
                    if (c.requant == RQ_ORT) std::memcpy(&bits, &mf[mi], 4);
                    if (c.requant == RQ_TFLITE || c.requant == RQ_TFLITE_SINGLE) bits = (uint32_t)mq[mi];
                    wd(31, 0) = (ap_uint<32>)(uint32_t)(c.has_bias ? bias[ch] : 0);
                    wd(63, 32) = (ap_uint<32>)bits;
                    wd(95, 64) = (ap_uint<32>)(uint32_t)(c.requant >= RQ_TFLITE ? sh[mi] : 0);
                }
                pp.push_back(wd);
            }
    const int Nw = c.requant != RQ_NONE ? (c.N + VEC - 1) / VEC : (c.N + 3) / 4;
    std::vector<word_t> yp((size_t)nrep * c.M * Nw, splat_tb(0x7e));  // a sentinel for unwritten words
    g_counters.clear();
    if (top(c, xp.data(), bp.data(), pp.data(), yp.data()) != 0) return -1;
    got.assign(n_out, (int32_t)0x7eadbeef);
    long seen = 0;
    for (int rep = 0; rep < nrep; rep++)
        for (int m = 0; m < c.M; m++)
            for (int n = 0; n < c.N; n++) {
                const word_t &wd = yp[((size_t)rep * c.M + m) * Nw + (c.requant != RQ_NONE ? n / VEC : n / 4)];
                int32_t v;
                if (c.requant != RQ_NONE) {
                    const int lane = n % VEC;
                    const int raw = (int)(unsigned)wd(8 * lane + 7, 8 * lane);
                    v = c.qmin < 0 ? (int32_t)(int8_t)raw : raw;
                } else {
                    const int lane = n % 4;
                    v = (int32_t)(uint32_t)wd(32 * lane + 31, 32 * lane);
                }
                size_t idx;
                if (conv) {
                    const int img = rep / groups, g = rep % groups;
                    idx = ((size_t)img * c.o + (size_t)g * c.N + n) * c.M + m;
                } else {
                    idx = ((size_t)rep * c.M + m) * c.N + n;
                }
                if (idx < n_out) {
                    got[idx] = v;
                    seen++;
                }
            }
    return seen;
}

#endif
