// edgediff FPGA reference design: an output-stationary ROWS x COLS systolic array for quantized
// conv / linear / attention matmuls (int8 x int8 -> int32, requantization unit beside the array).
//
// Synthesizable style for Vitis HLS (ap_int, hls::stream, pragmas); the same sources compile with
// plain g++ against the ap_types headers (C-simulation), which is how edgediff verifies them.
//
//   GEMM view:  Y[M, N] = sum_k A[m, k] * B[k, n]  (+ bias[n]), then requantize.
//   conv:       M = Ho*Wo output pixels, K = C/g*kh*kw, N = O/g; A comes from an on-the-fly im2col
//               reader over the input feature map (padding reads the zero point, i.e. a real 0).
//   linear:     A = activations (M = tokens), B = the int8 weight (K, N).
//   attention:  A = Q (or P), B = K^T (or V), both activations with zero points, one GEMM per head.
//
// Tiling: M by ROWS, N by COLS (edge tiles are padded with zeros and their outputs dropped) and K
// by KT (the on-chip operand buffers hold KT columns; the PE accumulators persist over K tiles).
#ifndef EDGEDIFF_SYSTOLIC_H
#define EDGEDIFF_SYSTOLIC_H

#include <ap_int.h>
#include <hls_stream.h>
#include <stdint.h>

#ifndef ROWS
#define ROWS 16
#endif
#ifndef COLS
#define COLS 16
#endif
#ifndef KT
#define KT 512
#endif

typedef ap_int<9> opnd_t;   // an int8/uint8 value minus its zero point: 9 bits signed
typedef ap_int<18> prod_t;  // opnd_t * opnd_t
typedef ap_int<32> acc_t;   // the PE accumulator (int32, like every runtime)

enum LayerKind { KIND_CONV = 0, KIND_GEMM = 1, KIND_MATMUL = 2 };
enum Requant { RQ_NONE = 0, RQ_ORT = 1, RQ_TFLITE = 2, RQ_TFLITE_SINGLE = 3 };

struct LayerCfg {
    int kind;
    // conv geometry (N images of C x H x W, O output channels, kh x kw kernel)
    int n, c, h, w, o, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups, ho, wo;
    // GEMM view: M x K times K x N, `reps` independent GEMMs (images x groups, or heads)
    int M, K, N, reps;
    int zp_a, zp_b;        // zero points of A and (matmul only) B; weights are symmetric
    int has_bias;
    int requant;           // Requant
    int out_zp, qmin, qmax;
    int per_channel;       // multipliers per output channel (else one)
};

struct LayerData {
    const int32_t *x;      // input feature map / activations (integers as stored)
    const int32_t *b;      // weights (conv: O x C/g x kh x kw, gemm: K x N) or the matmul's right operand
    const int32_t *bias;   // int32 bias at scale s_x*s_w (may be 0)
    const float *mult_f;   // RQ_ORT: float32 multipliers (s_x*s_w)/s_y
    const int32_t *mult_q; // RQ_TFLITE*: fixed-point multipliers
    const int32_t *shift;  // RQ_TFLITE*: power-of-two exponents
    int32_t *y;            // outputs (requantized integers or int32 accumulators)
};

// Runs one layer on the array; adds the cycles the array spends to *cycles (see systolic.cpp).
void systolic_layer(const LayerCfg &cfg, const LayerData &d, long long *cycles);

// The synthesis top (top.cpp): AXI interfaces around systolic_layer.
void systolic_top(LayerCfg cfg, const int32_t *x, const int32_t *b, const int32_t *bias, const float *mult_f,
                  const int32_t *mult_q, const int32_t *shift, int32_t *y, long long *cycles);

// The cycle model the array follows, in closed form (the Python estimator implements the same).
long long systolic_cycles(int M, int K, int N, int reps);

#endif
