// Nonlinear units beside the systolic array, in plain integer fixed point (bit-accurate twins in
// fpga/nonlinear.py): GroupNorm (+SiLU by table), softmax over a row of attention logits, GELU by table,
// residual add of two int8 tensors, 2x nearest upsample. Per-group / per-row constants (one integer
// square root and one divide) are computed outside the pipelined loops; the loops multiply and shift.
#ifndef EDGEDIFF_NONLINEAR_H
#define EDGEDIFF_NONLINEAR_H

#include <stdint.h>

#define NL_TC_ELEMS 16384  // LOOP_TRIPCOUNT bound: elements of one group / row
#define NL_TC_GROUPS 32
#define NL_TAB 4096  // on-chip table capacity (entries)

// round half up: (v + 2^(s-1)) >> s, arithmetic shift
static inline int64_t nl_rshift_round(int64_t v, int s) { return (v + ((int64_t)1 << (s - 1))) >> s; }

static inline int64_t nl_clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// floor(sqrt(v)) for v >= 0, bit by bit (32 fixed iterations)
static inline int64_t nl_isqrt(int64_t v) {
    uint64_t x = (uint64_t)v, r = 0, bit = (uint64_t)1 << 62;
isqrt:
    for (int i = 0; i < 32; i++) {
#pragma HLS PIPELINE II = 1
        if (x >= r + bit) {
            x -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    return (int64_t)r;
}

// GroupNorm over `groups` groups of n = cpg * hw int8 codes x (zero point zx), channel-major (C, HW).
// Per group: S = sum(q), V = n * sum(q^2) - S^2 (= n^2 var), sn = isqrt(V + eps_n2) (= n * std),
// recip = 2^40 / sn; per element z = (n q - S) * recip >> 24 (Q16), t = clamp(round((z * gamma_c + beta_c) / 2^24))
// (Q8 real, int16: gamma_c = round(gamma * 2^16), beta_c = round(beta * 2^32)). Output: lut[(t >> 4)
// + 2048] when lut is given (4096 entries, SiLU and the output quantizer folded in), else
// clamp(round(t * my / 2^24) + zy).
void nl_groupnorm(const int32_t *x, int zx, int c, int hw, int groups, int64_t eps_n2, const int32_t *gamma,
                  const int64_t *beta, const int32_t *lut, int64_t my, int zy, int qmin, int qmax, int32_t *y);

// Softmax over `rows` rows of `len` int32 logits (real scale s_l): d = min(max - a, 2^24 - 1); u = min(round(d * ms / 2^32),
// 4095) (units of 1/256, ms = round(s_l * 256 * 2^32)); e = exp_lut[u] (Q16); per row recip = (mp << 16) / sum(e)
// (mp = round(2^24 / s_p)); out = clamp(round(e * recip / 2^40) + zp).
void nl_softmax(const int32_t *a, int rows, int len, int64_t ms, const int32_t *exp_lut, int64_t mp, int zp,
                int qmin, int qmax, int32_t *y);

// y = lut[x - qmin_in] for each of n int8 codes (GELU, SiLU alone, any elementwise function of one code).
void nl_lut(const int32_t *x, int n, int qmin_in, const int32_t *lut, int32_t *y);

// Residual add: y = clamp(round(((a - za) * ma + (b - zb) * mb) / 2^24) + zy), ma = round(s_a / s_y * 2^24).
void nl_add(const int32_t *a, const int32_t *b, int n, int za, int zb, int64_t ma, int64_t mb, int zy, int qmin,
            int qmax, int32_t *y);

// 2x nearest upsample of (c, h, w) codes.
void nl_upsample2x(const int32_t *x, int c, int h, int w, int32_t *y);

// Requantize n codes: y = clamp(round((x - zx) * m / 2^24) + zy), m = round(s_x / s_y * 2^24) (a change of grid,
// e.g. a 16-bit residual stream onto a conv's int8 input grid).
void nl_requant(const int32_t *x, int n, int zx, int64_t m, int zy, int qmin, int qmax, int32_t *y);

// a (c, hw) plus b (c) broadcast over hw (the time embedding added to a conv's output), as nl_add.
void nl_add_bcast(const int32_t *a, const int32_t *b, int c, int hw, int za, int zb, int64_t ma, int64_t mb, int zy,
                  int qmin, int qmax, int32_t *y);

// An activation of Q8 codes t (real t / 256, what nl_groupnorm emits with my = 2^24): -2048 <= t < 2048 reads
// lut[t + 2048] (4096 entries at the full 1/256 step: SiLU, GELU or identity with the output quantizer folded in);
// t >= 2048 is the linear tail clamp(round(t * my / 2^24) + zy) (SiLU(v) = v there to 3e-4); t < -2048 reads lut[0].
void nl_act_q8(const int32_t *x, int n, const int32_t *lut, int64_t my, int zy, int qmin, int qmax, int32_t *y);

// Axis permutation of a (d0, d1, d2) tensor: perm 0 -> (d1, d0, d2) (heads split / merged), 1 -> (d1, d2, d0)
// (K^T per head), 2 -> (d0, d2, d1) (a transpose per batch: (C, HW) <-> (HW, C)). Address counters, no divides.
void nl_permute3(const int32_t *x, int d0, int d1, int d2, int perm, int32_t *y);

// One unit invocation behind the top's AXI-Lite registers (top.cpp: edgediff_top): which unit and its constants.
enum UnitKind { U_GN = 0, U_SOFTMAX = 1, U_LUT = 2, U_ADD = 3, U_UPSAMPLE = 4, U_REQUANT = 5, U_ADD_BCAST = 6,
                U_ACT = 7, U_PERMUTE = 8 };
struct NlCfg {
    int kind;
    int n, c, hw, groups, h, w, rows, len, d0, d1, d2, perm, qmin_in;
    int ntab;  // entries of the unit's table (copied on chip before the unit streams)
    int zx, za, zb, zy, qmin, qmax;
    long long eps_n2, my, ms, mp, ma, mb, m;
};
// Dispatch to one unit with flat arguments (x2: the second operand of an add; lut: the unit's table; gamma/beta:
// GroupNorm's affine constants). Returns 0, or 1 for an unknown unit.
int nl_unit(const NlCfg &u, const int32_t *x, const int32_t *x2, const int32_t *lut, const int32_t *gamma,
            const int64_t *beta, int32_t *y);

#endif
