// edgediff FPGA reference design: an output-stationary ROWS x COLS systolic array for quantized
// conv / linear / attention matmuls (int8 x int8 -> int32, requantization lanes beside the array),
// written as a Vitis HLS DATAFLOW pipeline of three stages that run concurrently on successive tiles:
//
//   load    (gmem0, gmem1)  128-bit words, 16 int8 operands each, one word per port per clock, in bursts,
//                           into per-row / per-column FIFOs (depth 2 x KT/16 words: a ping-pong operand buffer)
//   compute                 the wavefront: kc + ROWS + COLS - 2 clocks per K tile; the PE accumulators are
//                           swapped into a shadow bank after the last K tile (ping-pong accumulators)
//   drain   (gmem2)         one accumulator row per clock through COLS requantization lanes (bias and
//                           multipliers held on chip, copied once per layer), packed outputs written in bursts
//
//   GEMM view:  Y[M, N] = sum_k A[m, k] * B[k, n]  (+ bias[n]), then requantize.
//   conv:       M = Ho*Wo output pixels, K = taps x channel words; A is read by an im2col walk over an
//               NHWC feature map packed 16 channels per word (per group); padding taps read nothing and
//               feed the zero point (the real value 0).
//   linear:     A = activations [M][K words], B = the int8 weight stored transposed [N][K words].
//   attention:  A = Q (or P), B = K^T (or V) stored [rep][N][K words], both with zero points, one GEMM per head.
//
// Memory layouts (what the host, tb.cpp here, packs): every operand row is padded to whole words with
// its zero point; outputs are [rep][M][N words], int8 (16 per word) or int32 accumulators (4 per word).
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
#ifndef PARAM_TILES
#define PARAM_TILES 256  // on-chip bias/multiplier capacity: groups x ceil(N / COLS) tiles of COLS channels
#endif
// Fixed latencies the cycle model charges (assumptions, not measurements): the first word of a burst
// read arrives LOAD_LAT clocks after the request; the drain pipeline (bias, multiply, round, write
// response) is DRAIN_LAT deep; the per-layer parameter copy pays PARAM_LAT once.
#ifndef LOAD_LAT
#define LOAD_LAT 64
#endif
#ifndef DRAIN_LAT
#define DRAIN_LAT 16
#endif
#ifndef PARAM_LAT
#define PARAM_LAT 64
#endif

#define VEC 16         // int8 operands per 128-bit word
#define KTW (KT / VEC)  // K tile in words

#if (KT % VEC) != 0 || (COLS % VEC) != 0
#error "KT and COLS must be multiples of 16 (one 128-bit word holds 16 int8 values)"
#endif

typedef ap_uint<128> word_t;  // one AXI beat: 16 x int8, or 4 x int32
typedef ap_int<9> opnd_t;     // an int8/uint8 value minus its zero point: 9 bits signed
typedef ap_int<18> prod_t;    // opnd_t * opnd_t
typedef ap_int<32> acc_t;     // the PE accumulator (int32, like every runtime)

struct acc_row_t {
    acc_t v[COLS];
};

enum LayerKind { KIND_CONV = 0, KIND_GEMM = 1, KIND_MATMUL = 2 };
enum Requant { RQ_NONE = 0, RQ_ORT = 1, RQ_TFLITE = 2, RQ_TFLITE_SINGLE = 3 };

// The layer configuration (AXI-Lite registers). The top unpacks it into scalars: the stages take
// flat arguments only.
struct LayerCfg {
    int kind;
    // conv geometry (N images of C x H x W, O output channels, kh x kw kernel)
    int n, c, h, w, o, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups, ho, wo;
    // GEMM view: M x K times K x N, `reps` independent GEMMs (images x groups, or heads)
    int M, K, N, reps;
    int zp_a, zp_b;        // zero points of A and (matmul only) B; weights are symmetric
    int a_signed, b_signed;
    int has_bias;
    int requant;           // Requant
    int out_zp, qmin, qmax;
    int per_channel;       // multipliers per output channel (else one)
};

// Words of one GEMM row of A (and column of B): conv taps x channel words, else ceil(K / 16).
int k_words(const LayerCfg &cfg);

// The synthesis top (top.cpp). x: A operand words, b: B operand words, prm: one word per channel slot
// {bias, multiplier (float32 bits or int32), shift, 0} in [group][N tile][COLS] order, y: packed outputs.
// Returns 0, or 1 when the layer exceeds the on-chip parameter capacity.
int systolic_top(LayerCfg cfg, const word_t *x, const word_t *b, const word_t *prm, word_t *y);
// The whole-call top (top.cpp): op 0 a layer on the array, op 1 a nonlinear unit (nonlinear.h's NlCfg, nl_unit).
struct NlCfg;
int edgediff_top(int op, LayerCfg cfg, NlCfg ucfg, const word_t *x, const word_t *b, const word_t *prm, word_t *y,
                 const int32_t *ux, const int32_t *ux2, const int32_t *ulut, const int32_t *ugamma,
                 const int64_t *ubeta, int32_t *uy);
// The layer behind the top's interfaces (inlined into it: the non-inlined stages take flat arguments).
int systolic_layer(const LayerCfg &cfg, const word_t *x, const word_t *b, const word_t *prm, word_t *y);

#ifndef __SYNTHESIS__
// C-simulation only: what each stage did, clock by clock (the testbench compares it with the model).
#include <vector>
struct StageCounters {
    std::vector<long long> load;     // per job (output tile x K tile)
    std::vector<long long> compute;  // per job
    std::vector<char> last;          // per job: last K tile of its output tile
    std::vector<long long> drain;    // per output tile
    long long params = 0;            // the per-layer parameter copy
    long long words_read = 0, words_written = 0;
    void clear() {
        load.clear();
        compute.clear();
        last.clear();
        drain.clear();
        params = words_read = words_written = 0;
    }
};
extern StageCounters g_counters;
// The clocks of the three-stage DATAFLOW pipeline given the per-stage counts (fpga/estimate.py computes
// the same recurrence from closed-form stage costs).
long long pipeline_cycles(const StageCounters &s);
#endif

#endif
