// edgediff FPGA reference design: the load / compute / drain DATAFLOW stages and the requantization lanes.
// See systolic.h for the dataflow and the memory layouts. One iteration of an II=1 pipelined loop is one
// clock; in C-simulation each stage counts its own clocks (g_counters) so the testbench can compare them
// with fpga/estimate.py's closed form:
//   load, per job (output tile x K tile of kcw words; K is split into ceil(Kw / (KT/16)) balanced tiles):
//                                                       max(ROWS, COLS) * kcw + LOAD_LAT
//   compute, per job:                                   16 * kcw + ROWS + COLS - 2   (wavefront fill and drain)
//   drain, per output tile:                             ROWS * words per row + DRAIN_LAT
//   parameters, per layer:                              groups * N tiles * COLS + PARAM_LAT
#include "systolic.h"

#include <cmath>
#include <cstring>

#ifndef __SYNTHESIS__
StageCounters g_counters;
#define COUNT(stmt) stmt
#else
#define COUNT(stmt)
#endif

// Upper bounds for LOOP_TRIPCOUNT (csynth's latency report): a 64x64 feature map, 4096 channels, 8 heads.
#define TC_IMG 8
#define TC_GROUPS 64
#define TC_MT 256
#define TC_NT 64
#define TC_KT 8

int k_words(const LayerCfg &cfg) {
    if (cfg.kind == KIND_CONV) {
        const int cg = cfg.c / cfg.groups;
        return cfg.kh * cfg.kw * ((cg + VEC - 1) / VEC);
    }
    return (cfg.K + VEC - 1) / VEC;
}

static word_t splat(int v) {
#pragma HLS INLINE
    word_t wd = 0;
    for (int l = 0; l < VEC; l++) {
#pragma HLS UNROLL
        wd(8 * l + 7, 8 * l) = (ap_uint<8>)(v & 0xff);
    }
    return wd;
}

// ----------------------------------------------------------------------------- load stage
// One word per clock from each AXI port (A on gmem0, B on gmem1): row r of the A tile and column r of the
// B tile share an iteration. The im2col walk keeps (ki, kj, channel word) and the row's output pixel as
// counters, so the pipelined loop has no divides.
static void load_stage(int kind, const word_t *x, const word_t *b, int n_img, int groups, int M, int N, int Kw,
                       int mtiles, int ntiles, int ktiles, int khi, int n_hi, int h, int w, int wo, int sh, int sw,
                       int pt, int pl, int dh,
                       int dw, int kwid, int cgw, int zp_a, int zp_b, hls::stream<word_t> a_s[ROWS],
                       hls::stream<word_t> b_s[COLS]) {
#pragma HLS INLINE off
    const word_t pad_a = splat(zp_a), pad_b = splat(zp_b);
    const int rmax = ROWS > COLS ? ROWS : COLS;
    const bool conv = kind == KIND_CONV;
img:
    for (int img = 0; img < n_img; img++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_IMG
    grp:
        for (int g = 0; g < groups; g++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_GROUPS
            const long a_base = conv ? (long)(img * groups + g) * h : (long)img * M;  // feature-map rows / GEMM rows
            const long b_base = kind == KIND_CONV ? (long)g * N : (kind == KIND_MATMUL ? (long)img * N : 0);
            int oh0 = 0, ow0 = 0;  // the output pixel of the tile's first row
        mt:
            for (int mt = 0, m0 = 0; mt < mtiles; mt++, m0 += ROWS) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_MT
                int noh = oh0, now_ = ow0;  // the pixel of the tile's last row
            nt:
                for (int nt = 0, n0 = 0; nt < ntiles; nt++, n0 += COLS) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_NT
                    int ki_s = 0, kj_s = 0, cb_s = 0;  // where this K tile's walk starts
                kt:
                    for (int kt = 0, k0w = 0; kt < ktiles; kt++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_KT
                        const int kcw = kt < n_hi ? khi : khi - 1;  // balanced K tiles (no small remainder tile)
                        COUNT(long long cyc = LOAD_LAT);
                        int r = 0, wi = 0, ki = ki_s, kj = kj_s, cb = cb_s, oh = oh0, ow = ow0;
                    words:
                        for (int it = 0; it < rmax * kcw; it++) {
#pragma HLS LOOP_TRIPCOUNT min = 16 max = ROWS * KTW
#pragma HLS PIPELINE II = 1
                            const int m = m0 + r, n = n0 + r;
                            if (r < ROWS) {
                                word_t av = pad_a;
                                if (conv) {
                                    const int ih = oh * sh - pt + ki * dh, iw = ow * sw - pl + kj * dw;
                                    if (m < M && ih >= 0 && ih < h && iw >= 0 && iw < w) {
                                        av = x[((a_base + ih) * w + iw) * cgw + cb];
                                        COUNT(g_counters.words_read++);
                                    }
                                } else if (m < M) {
                                    av = x[(a_base + m) * Kw + k0w + wi];
                                    COUNT(g_counters.words_read++);
                                }
                                a_s[r].write(av);
                            }
                            if (r < COLS) {
                                word_t bv = pad_b;
                                if (n < N) {
                                    bv = b[(b_base + n) * Kw + k0w + wi];
                                    COUNT(g_counters.words_read++);
                                }
                                b_s[r].write(bv);
                            }
                            COUNT(cyc++);
                            // advance the walk: next channel word, next tap
                            const bool row_end = wi == kcw - 1;
                            if (++cb == cgw) {
                                cb = 0;
                                if (++kj == kwid) {
                                    kj = 0;
                                    ki++;
                                }
                            }
                            if (row_end) {
                                wi = 0;
                                if (r < rmax - 1) {
                                    ki = ki_s, kj = kj_s, cb = cb_s;
                                    r++;
                                    if (++ow == wo) {  // the next row's output pixel
                                        ow = 0;
                                        oh++;
                                    }
                                    if (r == ROWS - 1) {
                                        noh = oh, now_ = ow;
                                    }
                                }
                            } else {
                                wi++;
                            }
                        }
                        ki_s = ki, kj_s = kj, cb_s = cb;
                        k0w += kcw;
                        COUNT(g_counters.load.push_back(cyc));
                    }
                }
                // the next M tile starts one pixel after this tile's last row
                if (++now_ == wo) {
                    now_ = 0;
                    noh++;
                }
                oh0 = noh, ow0 = now_;
            }
        }
    }
}

// ----------------------------------------------------------------------------- compute stage
static opnd_t byte_operand(ap_uint<8> raw, int is_signed, int zp) {
#pragma HLS INLINE
    const int v = is_signed ? (int)(ap_int<8>)raw : (int)raw;
    return (opnd_t)(v - zp);
}

// The operand entering the array at its edge on this clock: byte k of the row's (column's)
// stream, a new VEC-byte word read every VEC bytes; 0 before the wavefront reaches it and after.
static opnd_t edge_operand(hls::stream<word_t> &s, word_t &word, int k, int kv, int is_signed, int zp) {
#pragma HLS INLINE
    if (k < 0 || k >= kv) return 0;
    if ((k & (VEC - 1)) == 0) word = s.read();
    const opnd_t v = byte_operand(word(7, 0), is_signed, zp);
    word >>= 8;
    return v;
}

// One K tile per call of the wavefront; PE (i, j) holds acc[i][j]. A enters from the left skewed by row
// (row i starts i clocks late), B from the top skewed by column; operands move one PE per clock. Each
// row/column FIFO yields a word every 16 clocks, shifted out a byte per clock.
static void compute_stage(int tiles, int ktiles, int khi, int n_hi, int zp_a, int zp_b, int a_signed, int b_signed,
                          hls::stream<word_t> a_s[ROWS], hls::stream<word_t> b_s[COLS], hls::stream<acc_row_t> &acc_s) {
#pragma HLS INLINE off
    acc_t acc[ROWS][COLS];
#pragma HLS ARRAY_PARTITION variable = acc complete dim = 0
    opnd_t a_reg[ROWS][COLS], b_reg[ROWS][COLS];
#pragma HLS ARRAY_PARTITION variable = a_reg complete dim = 0
#pragma HLS ARRAY_PARTITION variable = b_reg complete dim = 0
    word_t a_word[ROWS], b_word[COLS];
#pragma HLS ARRAY_PARTITION variable = a_word complete
#pragma HLS ARRAY_PARTITION variable = b_word complete
tiles:
    for (int tile = 0; tile < tiles; tile++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_MT * TC_NT
    kt:
        for (int kt = 0; kt < ktiles; kt++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_KT
            const int kcw = kt < n_hi ? khi : khi - 1;
            const int kv = kcw * VEC;
            for (int i = 0; i < ROWS; i++) {
#pragma HLS UNROLL
                for (int j = 0; j < COLS; j++) {
#pragma HLS UNROLL
                    a_reg[i][j] = b_reg[i][j] = 0;
                    if (kt == 0) acc[i][j] = 0;
                }
            }
            COUNT(long long cyc = 0);
        wavefront:
            for (int t = 0; t < kv + ROWS + COLS - 2; t++) {
#pragma HLS LOOP_TRIPCOUNT min = 16 + ROWS + COLS - 2 max = KT + ROWS + COLS - 2
#pragma HLS PIPELINE II = 1
                // walk the PEs from the far corner so each reads its neighbours' values of the previous clock
                for (int i = ROWS - 1; i >= 0; i--) {
#pragma HLS UNROLL
                    for (int j = COLS - 1; j >= 0; j--) {
#pragma HLS UNROLL
                        opnd_t a_in, b_in;
                        a_in = j == 0 ? edge_operand(a_s[i], a_word[i], t - i, kv, a_signed, zp_a) : a_reg[i][j - 1];
                        b_in = i == 0 ? edge_operand(b_s[j], b_word[j], t - j, kv, b_signed, zp_b) : b_reg[i - 1][j];
                        acc[i][j] += (prod_t)(a_in * b_in);
                        a_reg[i][j] = a_in;
                        b_reg[i][j] = b_in;
                    }
                }
                COUNT(cyc++);
            }
            COUNT(g_counters.compute.push_back(cyc));
            COUNT(g_counters.last.push_back(kt == ktiles - 1));
        }
        // swap the accumulators into the shadow bank the drain reads (a register-bank swap: no clocks)
    handoff:
        for (int i = 0; i < ROWS; i++) {
#pragma HLS UNROLL
            acc_row_t row;
            for (int j = 0; j < COLS; j++) {
#pragma HLS UNROLL
                row.v[j] = acc[i][j];
            }
            acc_s.write(row);
        }
    }
}

// ----------------------------------------------------------------------------- requantization lanes
static int32_t requant_ort(acc_t acc, float mult, int zp, int qmin, int qmax) {
#pragma HLS INLINE
    // ONNX Runtime (MLAS): float32 product, clamp, round half to even, add the zero point
    float v = (float)(int)acc * mult;
    const float lo = (float)(qmin - zp), hi = (float)(qmax - zp);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    return (int32_t)std::nearbyint(v) + zp;
}

static long long srdhm(long long a, long long b) {
#pragma HLS INLINE
    // gemmlowp SaturatingRoundingDoublingHighMul (C division truncates toward zero; a constant power of two)
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    const long long ab = a * b;
    const long long nudge = ab >= 0 ? (1LL << 30) : (1 - (1LL << 30));
    return (ab + nudge) / (1LL << 31);
}

static long long rounding_divide_by_pot(long long x, int e) {
#pragma HLS INLINE
    const long long mask = (1LL << e) - 1;
    const long long rem = x & mask;
    const long long thr = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (rem > thr ? 1 : 0);
}

static int32_t requant_tflite(acc_t acc, int32_t q, int shift, int zp, int qmin, int qmax, bool single) {
#pragma HLS INLINE
    long long v;
    if (single) {
        const int total = 31 - shift;
        v = ((long long)(int)acc * q + (1LL << (total - 1))) >> total;
        v = v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v);
    } else {
        const int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
        long long a = (long long)(int)acc * (1LL << left);
        a = a < INT32_MIN ? INT32_MIN : (a > INT32_MAX ? INT32_MAX : a);
        v = rounding_divide_by_pot(srdhm(a, q), right);
    }
    v += zp;
    return (int32_t)(v < qmin ? qmin : (v > qmax ? qmax : v));
}

// ----------------------------------------------------------------------------- drain stage
// One accumulator row per output word group: COLS lanes add the bias and requantize in parallel (parameters
// from the on-chip banks, lane j reads bank j), the packed row goes out as consecutive words (a burst).
static void drain_stage(int n_img, int groups, int M, int N, int mtiles, int ntiles, int Nw, int has_bias, int requant,
                        int out_zp, int qmin, int qmax, const int32_t p_bias[PARAM_TILES][COLS],
                        const float p_multf[PARAM_TILES][COLS], const int32_t p_multq[PARAM_TILES][COLS],
                        const int32_t p_shift[PARAM_TILES][COLS], hls::stream<acc_row_t> &acc_s, word_t *y) {
#pragma HLS INLINE off
    const int wpr = requant != RQ_NONE ? COLS / VEC : COLS / 4;  // words per accumulator row
    // Deliberately the same img/grp loop nest as load_stage: each DATAFLOW stage walks the tiles in
    // its own labelled, trip-counted loops (a shared helper would have to be inlined into both anyway).
    int32_t outv[COLS];
#pragma HLS ARRAY_PARTITION variable = outv complete
img:
    for (int img = 0; img < n_img; img++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_IMG
    grp:
        for (int g = 0; g < groups; g++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_GROUPS
            const long rep = (long)img * groups + g;
        mt:
            for (int mt = 0, m0 = 0; mt < mtiles; mt++, m0 += ROWS) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_MT
            nt:
                for (int nt = 0; nt < ntiles; nt++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = TC_NT
                    const int ptile = g * ntiles + nt;
                    COUNT(long long cyc = DRAIN_LAT);
                    int r = 0, ws = 0;
                rows:
                    for (int it = 0; it < ROWS * wpr; it++) {
#pragma HLS LOOP_TRIPCOUNT min = ROWS * COLS / VEC max = ROWS * COLS / 4
#pragma HLS PIPELINE II = 1
                        if (ws == 0) {
                            const acc_row_t row = acc_s.read();
                            for (int j = 0; j < COLS; j++) {
#pragma HLS UNROLL
                                acc_t a = row.v[j];
                                if (has_bias) a += p_bias[ptile][j];
                                int32_t v;
                                if (requant == RQ_ORT)
                                    v = requant_ort(a, p_multf[ptile][j], out_zp, qmin, qmax);
                                else if (requant == RQ_TFLITE || requant == RQ_TFLITE_SINGLE)
                                    v = requant_tflite(a, p_multq[ptile][j], p_shift[ptile][j], out_zp, qmin, qmax,
                                                       requant == RQ_TFLITE_SINGLE);
                                else
                                    v = (int32_t)(int)a;
                                outv[j] = v;
                            }
                        }
                        word_t wd = 0;
                        if (requant != RQ_NONE) {
                            for (int l = 0; l < VEC; l++) {
#pragma HLS UNROLL
                                wd(8 * l + 7, 8 * l) = (ap_uint<8>)(outv[ws * VEC + l] & 0xff);
                            }
                        } else {
                            for (int l = 0; l < 4; l++) {
#pragma HLS UNROLL
                                wd(32 * l + 31, 32 * l) = (ap_uint<32>)(uint32_t)outv[ws * 4 + l];
                            }
                        }
                        const int m = m0 + r, word = nt * wpr + ws;
                        if (m < M && word < Nw) {  // padded rows / words past the row are not written
                            y[(rep * M + m) * Nw + word] = wd;
                            COUNT(g_counters.words_written++);
                        }
                        COUNT(cyc++);
                        if (++ws == wpr) {
                            ws = 0;
                            r++;
                        }
                    }
                    COUNT(g_counters.drain.push_back(cyc));
                }
            }
        }
    }
    (void)N;
}

// ----------------------------------------------------------------------------- the layer
static void run_layer(int kind, const word_t *x, const word_t *b, word_t *y, int n_img, int groups, int M, int N,
                      int Kw, int mtiles, int ntiles, int ktiles, int khi, int n_hi, int Nw, int h, int w, int wo, int sh, int sw, int pt,
                      int pl, int dh, int dw, int kwid, int cgw, int zp_a, int zp_b, int a_signed, int b_signed,
                      int has_bias, int requant, int out_zp, int qmin, int qmax,
                      const int32_t p_bias[PARAM_TILES][COLS], const float p_multf[PARAM_TILES][COLS],
                      const int32_t p_multq[PARAM_TILES][COLS], const int32_t p_shift[PARAM_TILES][COLS]) {
#pragma HLS INLINE off
#pragma HLS DATAFLOW
    hls::stream<word_t> a_s[ROWS], b_s[COLS];
#pragma HLS STREAM variable = a_s depth = 2 * KTW
#pragma HLS STREAM variable = b_s depth = 2 * KTW
    hls::stream<acc_row_t> acc_s;
#pragma HLS STREAM variable = acc_s depth = ROWS
    load_stage(kind, x, b, n_img, groups, M, N, Kw, mtiles, ntiles, ktiles, khi, n_hi, h, w, wo, sh, sw, pt, pl, dh, dw, kwid, cgw,
               zp_a, zp_b, a_s, b_s);
    compute_stage(n_img * groups * mtiles * ntiles, ktiles, khi, n_hi, zp_a, zp_b, a_signed, b_signed, a_s, b_s, acc_s);
    drain_stage(n_img, groups, M, N, mtiles, ntiles, Nw, has_bias, requant, out_zp, qmin, qmax, p_bias, p_multf, p_multq,
                p_shift, acc_s, y);
}

// The per-layer copy of bias and multipliers into the lane banks: one word per channel slot.
static void load_params(const word_t *prm, int ptiles, int32_t p_bias[PARAM_TILES][COLS],
                        float p_multf[PARAM_TILES][COLS], int32_t p_multq[PARAM_TILES][COLS],
                        int32_t p_shift[PARAM_TILES][COLS]) {
#pragma HLS INLINE off
    COUNT(long long cyc = PARAM_LAT);
    int t = 0, j = 0;
params:
    for (int it = 0; it < ptiles * COLS; it++) {
#pragma HLS LOOP_TRIPCOUNT min = COLS max = PARAM_TILES * COLS
#pragma HLS PIPELINE II = 1
        const word_t wd = prm[it];
        COUNT(g_counters.words_read++);
        p_bias[t][j] = (int32_t)(uint32_t)wd(31, 0);
        const uint32_t bits = (uint32_t)wd(63, 32);
        float f;
        std::memcpy(&f, &bits, 4);
        p_multf[t][j] = f;
        p_multq[t][j] = (int32_t)bits;
        p_shift[t][j] = (int32_t)(uint32_t)wd(95, 64);
        COUNT(cyc++);
        if (++j == COLS) {
            j = 0;
            t++;
        }
    }
    COUNT(g_counters.params = cyc);
}

int systolic_layer(const LayerCfg &cfg, const word_t *x, const word_t *b, const word_t *prm, word_t *y) {
#pragma HLS INLINE
    static int32_t p_bias[PARAM_TILES][COLS], p_multq[PARAM_TILES][COLS], p_shift[PARAM_TILES][COLS];
    static float p_multf[PARAM_TILES][COLS];
#pragma HLS ARRAY_PARTITION variable = p_bias complete dim = 2
#pragma HLS ARRAY_PARTITION variable = p_multf complete dim = 2
#pragma HLS ARRAY_PARTITION variable = p_multq complete dim = 2
#pragma HLS ARRAY_PARTITION variable = p_shift complete dim = 2
    const bool conv = cfg.kind == KIND_CONV;
    const int groups = conv ? cfg.groups : 1;
    const int n_img = conv ? cfg.n : cfg.reps;
    const int Kw = k_words(cfg);
    const int mtiles = (cfg.M + ROWS - 1) / ROWS, ntiles = (cfg.N + COLS - 1) / COLS, ktiles = (Kw + KTW - 1) / KTW;
    // K split into ktiles balanced tiles: n_hi of khi words, the rest khi - 1 (per layer, outside the loops)
    const int khi = (Kw + ktiles - 1) / ktiles, n_hi = Kw - (khi - 1) * ktiles;
    const int Nw = cfg.requant != RQ_NONE ? (cfg.N + VEC - 1) / VEC : (cfg.N + 3) / 4;
    const int cgw = conv ? (cfg.c / cfg.groups + VEC - 1) / VEC : 1;
    if (groups * ntiles > PARAM_TILES) return 1;
    load_params(prm, groups * ntiles, p_bias, p_multf, p_multq, p_shift);
    run_layer(cfg.kind, x, b, y, n_img, groups, cfg.M, cfg.N, Kw, mtiles, ntiles, ktiles, khi, n_hi, Nw, cfg.h, cfg.w,
              conv ? cfg.wo : 1, cfg.sh, cfg.sw, cfg.pt, cfg.pl, cfg.dh, cfg.dw, conv ? cfg.kw : 1, conv ? cgw : 1 << 30,
              cfg.zp_a, cfg.zp_b, cfg.a_signed, cfg.b_signed, cfg.has_bias, cfg.requant, cfg.out_zp, cfg.qmin, cfg.qmax,
              p_bias, p_multf, p_multq, p_shift);
    return 0;
}

#ifndef __SYNTHESIS__
long long pipeline_cycles(const StageCounters &s) {
    // Ping-pong operand FIFOs: load of job j waits until compute released job j-2's bank; compute of job j
    // waits for its operands and its previous job; the accumulator swap after an output tile's last job
    // waits until the drain finished the previous tile (one shadow bank). Times are job end times.
    long long eL1 = 0, eC1 = 0, eC2 = 0, eD = 0;
    size_t tile = 0;
    for (size_t j = 0; j < s.load.size(); j++) {
        const long long eL = (eL1 > eC2 ? eL1 : eC2) + s.load[j];
        long long eC = (eL > eC1 ? eL : eC1) + s.compute[j];
        if (s.last[j]) {
            if (eC < eD) eC = eD;
            eD = eC + s.drain[tile++];
        }
        eL1 = eL;
        eC2 = eC1;
        eC1 = eC;
    }
    return s.params + eD;
}
#endif
