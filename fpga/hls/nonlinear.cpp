// Nonlinear units in integer fixed point; see nonlinear.h for the arithmetic (fpga/nonlinear.py mirrors it).
#include "nonlinear.h"

void nl_groupnorm(const int32_t *x, int zx, int c, int hw, int groups, int64_t eps_n2, const int32_t *gamma,
                  const int64_t *beta, const int32_t *lut, int64_t my, int zy, int qmin, int qmax, int32_t *y) {
    const int cpg = c / groups;  // once per layer, outside the pipelined loops
    const int64_t n = (int64_t)cpg * hw;
groups:
    for (int g = 0; g < groups; g++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_GROUPS
        const int32_t *xg = x + (int64_t)g * n;
        int64_t s = 0, ss = 0;
    stats:
        for (int64_t i = 0; i < n; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
            const int64_t q = xg[i] - zx;
            s += q;
            ss += q * q;
        }
        const int64_t sn = nl_isqrt(n * ss - s * s + eps_n2);
        const int64_t recip = sn > 0 ? ((int64_t)1 << 40) / sn : 0;  // one divide per group
        int ch = g * cpg, k = 0;
    norm:
        for (int64_t i = 0; i < n; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
            const int64_t z = ((n * (xg[i] - zx) - s) * recip) >> 24;
            const int64_t t = nl_clamp(nl_rshift_round(z * gamma[ch] + beta[ch], 24), -32768, 32767);
            int64_t v;
            if (lut) {
                v = lut[(t >> 4) + 2048];
            } else {
                v = nl_clamp(nl_rshift_round(t * my, 24) + zy, qmin, qmax);
            }
            y[(int64_t)g * n + i] = (int32_t)v;
            if (++k == hw) {  // next channel: a counter, not a divide
                k = 0;
                ch++;
            }
        }
    }
}

void nl_softmax(const int32_t *a, int rows, int len, int64_t ms, const int32_t *exp_lut, int64_t mp, int zp,
                int qmin, int qmax, int32_t *y) {
rows:
    for (int r = 0; r < rows; r++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
        const int32_t *ar = a + (int64_t)r * len;
        int64_t m = ar[0];
    max:
        for (int i = 1; i < len; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
            m = ar[i] > m ? ar[i] : m;
        }
        int64_t sum = 0;
    exp_sum:
        for (int i = 0; i < len; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
            const int64_t d = nl_clamp(m - ar[i], 0, 16777215);  // d * ms stays in int64
            sum += exp_lut[nl_clamp((d * ms + ((int64_t)1 << 31)) >> 32, 0, 4095)];
        }
        const int64_t recip = (mp << 16) / sum;  // one divide per row
    out:
        for (int i = 0; i < len; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
            const int64_t d = nl_clamp(m - ar[i], 0, 16777215);  // d * ms stays in int64
            const int64_t e = exp_lut[nl_clamp((d * ms + ((int64_t)1 << 31)) >> 32, 0, 4095)];
            y[(int64_t)r * len + i] = (int32_t)nl_clamp(nl_rshift_round(e * recip, 40) + zp, qmin, qmax);
        }
    }
}

void nl_lut(const int32_t *x, int n, int qmin_in, const int32_t *lut, int32_t *y) {
elems:
    for (int i = 0; i < n; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        y[i] = lut[x[i] - qmin_in];
    }
}

void nl_add(const int32_t *a, const int32_t *b, int n, int za, int zb, int64_t ma, int64_t mb, int zy, int qmin,
            int qmax, int32_t *y) {
elems:
    for (int i = 0; i < n; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        const int64_t v = (int64_t)(a[i] - za) * ma + (int64_t)(b[i] - zb) * mb;
        y[i] = (int32_t)nl_clamp(nl_rshift_round(v, 24) + zy, qmin, qmax);
    }
}

void nl_upsample2x(const int32_t *x, int c, int h, int w, int32_t *y) {
    int ch = 0, i = 0, j = 0;
pixels:
    for (int64_t o = 0; o < (int64_t)c * h * w * 4; o++) {
#pragma HLS LOOP_TRIPCOUNT min = 4 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        // output (ch, i, j) of the (2h, 2w) map reads input (ch, i >> 1, j >> 1)
        y[o] = x[((int64_t)ch * h + (i >> 1)) * w + (j >> 1)];
        if (++j == 2 * w) {
            j = 0;
            if (++i == 2 * h) {
                i = 0;
                ch++;
            }
        }
    }
}

void nl_requant(const int32_t *x, int n, int zx, int64_t m, int zy, int qmin, int qmax, int32_t *y) {
elems:
    for (int i = 0; i < n; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        y[i] = (int32_t)nl_clamp(nl_rshift_round((int64_t)(x[i] - zx) * m, 24) + zy, qmin, qmax);
    }
}

void nl_add_bcast(const int32_t *a, const int32_t *b, int c, int hw, int za, int zb, int64_t ma, int64_t mb, int zy,
                  int qmin, int qmax, int32_t *y) {
    int ch = 0, k = 0;
elems:
    for (int64_t i = 0; i < (int64_t)c * hw; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        const int64_t v = (int64_t)(a[i] - za) * ma + (int64_t)(b[ch] - zb) * mb;
        y[i] = (int32_t)nl_clamp(nl_rshift_round(v, 24) + zy, qmin, qmax);
        if (++k == hw) {  // next channel: a counter, not a divide
            k = 0;
            ch++;
        }
    }
}

void nl_act_q8(const int32_t *x, int n, const int32_t *lut, int64_t my, int zy, int qmin, int qmax, int32_t *y) {
elems:
    for (int i = 0; i < n; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        const int64_t t = x[i];
        int64_t v;
        if (t >= 2048)
            v = nl_clamp(nl_rshift_round(t * my, 24) + zy, qmin, qmax);
        else
            v = lut[t < -2048 ? 0 : t + 2048];
        y[i] = (int32_t)v;
    }
}

void nl_permute3(const int32_t *x, int d0, int d1, int d2, int perm, int32_t *y) {
    int i = 0, j = 0, k = 0;  // the input index (i, j, k) of element o, kept by counters
elems:
    for (int64_t o = 0; o < (int64_t)d0 * d1 * d2; o++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TC_ELEMS
#pragma HLS PIPELINE II = 1
        int64_t dst;
        if (perm == 0)
            dst = ((int64_t)j * d0 + i) * d2 + k;
        else if (perm == 1)
            dst = ((int64_t)j * d2 + k) * d0 + i;
        else
            dst = ((int64_t)i * d2 + k) * d1 + j;
        y[dst] = x[o];
        if (++k == d2) {
            k = 0;
            if (++j == d1) {
                j = 0;
                i++;
            }
        }
    }
}

int nl_unit(const NlCfg &u, const int32_t *x, const int32_t *x2, const int32_t *lut_in, const int32_t *gamma,
            const int64_t *beta, int32_t *y) {
    // the table (SiLU / GELU / exp / a code map) is read at random: copy it on chip first, one entry per clock
    static int32_t tab[NL_TAB];
    if (u.ntab > NL_TAB) return 1;
table:
    for (int i = 0; i < u.ntab; i++) {
#pragma HLS LOOP_TRIPCOUNT min = 1 max = NL_TAB
#pragma HLS PIPELINE II = 1
        tab[i] = lut_in[i];
    }
    const int32_t *lut = tab;
    switch (u.kind) {
        case U_GN:
            nl_groupnorm(x, u.zx, u.c, u.hw, u.groups, u.eps_n2, gamma, beta, u.n ? lut : nullptr, u.my, u.zy, u.qmin,
                         u.qmax, y);
            return 0;
        case U_SOFTMAX:
            nl_softmax(x, u.rows, u.len, u.ms, lut, u.mp, u.zy, u.qmin, u.qmax, y);
            return 0;
        case U_LUT:
            nl_lut(x, u.n, u.qmin_in, lut, y);
            return 0;
        case U_ADD:
            nl_add(x, x2, u.n, u.za, u.zb, u.ma, u.mb, u.zy, u.qmin, u.qmax, y);
            return 0;
        case U_UPSAMPLE:
            nl_upsample2x(x, u.c, u.h, u.w, y);
            return 0;
        case U_REQUANT:
            nl_requant(x, u.n, u.zx, u.m, u.zy, u.qmin, u.qmax, y);
            return 0;
        case U_ADD_BCAST:
            nl_add_bcast(x, x2, u.c, u.hw, u.za, u.zb, u.ma, u.mb, u.zy, u.qmin, u.qmax, y);
            return 0;
        case U_ACT:
            nl_act_q8(x, u.n, lut, u.my, u.zy, u.qmin, u.qmax, y);
            return 0;
        case U_PERMUTE:
            nl_permute3(x, u.d0, u.d1, u.d2, u.perm, y);
            return 0;
        default:
            return 1;
    }
}
