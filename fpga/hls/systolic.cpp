// edgediff FPGA reference design: the systolic array, its operand readers and the requantization unit.
// See systolic.h for the dataflow. Cycle model (counted in `compute_tile` and `drain_tile`, one
// iteration of an II=1 pipelined loop = one clock):
//   per output tile and per K tile of length kc:  kc + ROWS + COLS - 2   (skewed fill, stream, drain of the wavefront)
//   per output tile:                               ROWS                  (shift the accumulators out, one row per clock,
//                                                                         through COLS requantization lanes)
// Operand loads are double-buffered (DATAFLOW) and overlap the previous tile's compute, so they are not counted.
#include "systolic.h"

#include <cmath>

// ----------------------------------------------------------------------------- operand readers
// A[m][k] of repetition `rep`, zero point already subtracted. For a conv this is the on-the-fly im2col
// reader: m -> output pixel (oh, ow), k -> (channel, ki, kj); a tap in the padding reads the zero point,
// which is the real value 0, so it contributes 0 to the accumulator.
static opnd_t read_a(const LayerCfg &cfg, const int32_t *x, int rep, int m, int k) {
#pragma HLS INLINE
    if (cfg.kind == KIND_CONV) {
        const int cg = cfg.c / cfg.groups;
        const int img = rep / cfg.groups, g = rep % cfg.groups;
        const int kk = cfg.kh * cfg.kw;
        const int c = k / kk, ki = (k % kk) / cfg.kw, kj = k % cfg.kw;
        const int oh = m / cfg.wo, ow = m % cfg.wo;
        const int ih = oh * cfg.sh - cfg.pt + ki * cfg.dh;
        const int iw = ow * cfg.sw - cfg.pl + kj * cfg.dw;
        if (ih < 0 || ih >= cfg.h || iw < 0 || iw >= cfg.w) return 0;
        const long idx = (((long)img * cfg.c + g * cg + c) * cfg.h + ih) * cfg.w + iw;
        return (opnd_t)(x[idx] - cfg.zp_a);
    }
    const long idx = ((long)rep * cfg.M + m) * cfg.K + k;  // gemm has reps == 1
    return (opnd_t)(x[idx] - cfg.zp_a);
}

// B[k][n] of repetition `rep`: the weight (symmetric, zero point 0) or the matmul's right operand.
static opnd_t read_b(const LayerCfg &cfg, const int32_t *b, int rep, int k, int n) {
#pragma HLS INLINE
    if (cfg.kind == KIND_CONV) {
        const int og = cfg.o / cfg.groups, g = rep % cfg.groups;
        return (opnd_t)b[(long)(g * og + n) * cfg.K + k];
    }
    if (cfg.kind == KIND_GEMM) return (opnd_t)b[(long)k * cfg.N + n];
    return (opnd_t)(b[((long)rep * cfg.K + k) * cfg.N + n] - cfg.zp_b);
}

static int channel_of(const LayerCfg &cfg, int rep, int n) {
    if (cfg.kind == KIND_CONV) return (rep % cfg.groups) * (cfg.o / cfg.groups) + n;
    if (cfg.kind == KIND_GEMM) return n;
    return 0;
}

static long out_index(const LayerCfg &cfg, int rep, int m, int n) {
    if (cfg.kind == KIND_CONV) {
        const int img = rep / cfg.groups;
        return ((long)img * cfg.o + channel_of(cfg, rep, n)) * ((long)cfg.ho * cfg.wo) + m;
    }
    return ((long)rep * cfg.M + m) * cfg.N + n;
}

// ----------------------------------------------------------------------------- requantization unit
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
    // gemmlowp SaturatingRoundingDoublingHighMul (C division truncates toward zero)
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    const long long ab = a * b;
    const long long nudge = ab >= 0 ? (1LL << 30) : (1 - (1LL << 30));
    return (ab + nudge) / (1LL << 31);
}

static long long rounding_divide_by_pot(long long x, int e) {
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

// ----------------------------------------------------------------------------- the array
// One K tile through the output-stationary array. PE (i, j) holds acc[i][j] for output (m0+i, n0+j);
// A enters from the left skewed by row (row i starts i clocks late), B from the top skewed by column,
// operands move one PE per clock. The loop body is one clock; the PE loops are fully unrolled.
static void compute_tile(const opnd_t a_buf[ROWS][KT], const opnd_t b_buf[KT][COLS], int kc, acc_t acc[ROWS][COLS],
                         long long *cycles) {
    opnd_t a_reg[ROWS][COLS], b_reg[ROWS][COLS];
#pragma HLS ARRAY_PARTITION variable = a_reg complete dim = 0
#pragma HLS ARRAY_PARTITION variable = b_reg complete dim = 0
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < COLS; j++) a_reg[i][j] = b_reg[i][j] = 0;
    const int T = kc + ROWS + COLS - 2;
wavefront:
    for (int t = 0; t < T; t++) {
#pragma HLS PIPELINE II = 1
        // walk the PEs from the far corner so each reads its neighbours' values of the previous clock
        for (int i = ROWS - 1; i >= 0; i--) {
#pragma HLS UNROLL
            for (int j = COLS - 1; j >= 0; j--) {
#pragma HLS UNROLL
                opnd_t a_in, b_in;
                if (j == 0) {
                    const int k = t - i;
                    a_in = (k >= 0 && k < kc) ? a_buf[i][k] : (opnd_t)0;
                } else {
                    a_in = a_reg[i][j - 1];
                }
                if (i == 0) {
                    const int k = t - j;
                    b_in = (k >= 0 && k < kc) ? b_buf[k][j] : (opnd_t)0;
                } else {
                    b_in = b_reg[i - 1][j];
                }
                acc[i][j] += (prod_t)(a_in * b_in);
                a_reg[i][j] = a_in;
                b_reg[i][j] = b_in;
            }
        }
        (*cycles)++;
    }
}

// Shift the accumulators out one row per clock into the requantization lanes (one per column).
static void drain_tile(const LayerCfg &cfg, const LayerData &d, const acc_t acc[ROWS][COLS], int rep, int m0, int n0,
                       long long *cycles) {
    hls::stream<acc_t> lane[COLS];
#pragma HLS STREAM variable = lane depth = 2
drain:
    for (int i = 0; i < ROWS; i++) {
#pragma HLS PIPELINE II = 1
        for (int j = 0; j < COLS; j++) {
#pragma HLS UNROLL
            lane[j].write(acc[i][j]);
        }
        for (int j = 0; j < COLS; j++) {
#pragma HLS UNROLL
            acc_t a = lane[j].read();
            const int m = m0 + i, n = n0 + j;
            if (m >= cfg.M || n >= cfg.N) continue;  // edge tile: a padded row/column, dropped
            const int ch = channel_of(cfg, rep, n);
            if (cfg.has_bias) a += d.bias[ch];
            const int mi = cfg.per_channel ? ch : 0;
            int32_t y;
            if (cfg.requant == RQ_ORT)
                y = requant_ort(a, d.mult_f[mi], cfg.out_zp, cfg.qmin, cfg.qmax);
            else if (cfg.requant == RQ_TFLITE || cfg.requant == RQ_TFLITE_SINGLE)
                y = requant_tflite(a, d.mult_q[mi], d.shift[mi], cfg.out_zp, cfg.qmin, cfg.qmax,
                                   cfg.requant == RQ_TFLITE_SINGLE);
            else
                y = (int32_t)(int)a;
            d.y[out_index(cfg, rep, m, n)] = y;
        }
        (*cycles)++;
    }
}

void systolic_layer(const LayerCfg &cfg, const LayerData &d, long long *cycles) {
    static opnd_t a_buf[ROWS][KT];
    static opnd_t b_buf[KT][COLS];
#pragma HLS ARRAY_PARTITION variable = a_buf complete dim = 1
#pragma HLS ARRAY_PARTITION variable = b_buf complete dim = 2
    acc_t acc[ROWS][COLS];
#pragma HLS ARRAY_PARTITION variable = acc complete dim = 0
reps:
    for (int rep = 0; rep < cfg.reps; rep++) {
    m_tiles:
        for (int m0 = 0; m0 < cfg.M; m0 += ROWS) {
        n_tiles:
            for (int n0 = 0; n0 < cfg.N; n0 += COLS) {
                for (int i = 0; i < ROWS; i++)
                    for (int j = 0; j < COLS; j++) acc[i][j] = 0;
            k_tiles:
                for (int k0 = 0; k0 < cfg.K; k0 += KT) {
                    const int kc = cfg.K - k0 < KT ? cfg.K - k0 : KT;
                    // operand readers (double-buffered in the DATAFLOW design: not on the critical path)
                    for (int k = 0; k < kc; k++) {
#pragma HLS PIPELINE II = 1
                        for (int i = 0; i < ROWS; i++)
                            a_buf[i][k] = (m0 + i < cfg.M) ? read_a(cfg, d.x, rep, m0 + i, k0 + k) : (opnd_t)0;
                        for (int j = 0; j < COLS; j++)
                            b_buf[k][j] = (n0 + j < cfg.N) ? read_b(cfg, d.b, rep, k0 + k, n0 + j) : (opnd_t)0;
                    }
                    compute_tile(a_buf, b_buf, kc, acc, cycles);
                }
                drain_tile(cfg, d, acc, rep, m0, n0, cycles);
            }
        }
    }
}

long long systolic_cycles(int M, int K, int N, int reps) {
    const long long mt = (M + ROWS - 1) / ROWS, nt = (N + COLS - 1) / COLS;
    const long long full = K / KT, rest = K % KT;
    const long long per_tile = full * (KT + ROWS + COLS - 2) + (rest ? rest + ROWS + COLS - 2 : 0) + ROWS;
    return (long long)reps * mt * nt * per_tile;
}
