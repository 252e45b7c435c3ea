// C-simulation of a whole denoiser call: the array layers (systolic_top) and the nonlinear units
// (nonlinear.cpp) chained in the order of the graph, every intermediate held as int32 codes.
//
//   call_tb PROGRAM_DIR OUT_DIR
// PROGRAM_DIR/program.txt has one op per line: "OP STEM OUT N_OUT N_IN IN...", buffers named by integers;
// STEM.cfg (key value) and STEM.*.bin hold each op's constants (written by fpga/callsim.py from the program
// fpga/program.py builds). PROGRAM_DIR/inputs.txt: "BUF FILE" lines (int32 little-endian). Every buffer the
// call produced is written to OUT_DIR/BUF.bin so the host can compare it with the NumPy twin, op by op.
// Prints "OP STEM cycles=C elements=E" per op (array: the DATAFLOW pipeline's counted clocks; units: elements
// streamed) and exits 0, 3 on unreadable files, 4 on a layer the design refuses, 5 on an unknown op.
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "host.h"
#include "nonlinear.h"

typedef std::vector<int32_t> buf_t;

// the array's layers go through the whole-call top too (op 0), so what runs here is what edgediff_top synthesizes
static int array_via_top(LayerCfg c, const word_t *x, const word_t *b, const word_t *prm, word_t *y) {
    NlCfg u;
    std::memset(&u, 0, sizeof u);
    return edgediff_top(0, c, u, x, b, prm, y, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
}

static NlCfg unit_cfg(int kind, std::map<std::string, long long> &kv, long n) {
    NlCfg u;
    std::memset(&u, 0, sizeof u);
    u.kind = kind;
    u.n = (int)n;
#define I(f) u.f = (int)kv[#f]
#define L(f) u.f = kv[#f]
    I(c); I(hw); I(groups); I(h); I(w); I(rows); I(len); I(d0); I(d1); I(d2); I(perm); I(qmin_in); I(ntab);
    I(zx); I(za); I(zb); I(zy); I(qmin); I(qmax);
    L(eps_n2); L(my); L(ms); L(mp); L(ma); L(mb); L(m);
#undef I
#undef L
    if (kind == U_GN) u.n = 0;  // no table: the Q8 output
    return u;
}

static int unit(int kind, std::map<std::string, long long> &kv, long n, const int32_t *x, const int32_t *x2,
                const int32_t *lut, const int32_t *gamma, const int64_t *beta, int32_t *y) {
    const NlCfg u = unit_cfg(kind, kv, n);
    LayerCfg none;
    std::memset(&none, 0, sizeof none);
    return edgediff_top(1, none, u, nullptr, nullptr, nullptr, nullptr, x, x2, lut, gamma, beta, y);
}

template <typename T>
static std::vector<T> as_vec(const std::vector<char> &raw) {
    std::vector<T> v(raw.size() / sizeof(T));
    if (!v.empty()) std::memcpy(v.data(), raw.data(), v.size() * sizeof(T));
    return v;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s PROGRAM_DIR OUT_DIR\n", argv[0]);
        return 3;
    }
    const std::string dir = argv[1], out = argv[2];
    std::map<int, buf_t> bufs;
    FILE *inl = std::fopen((dir + "/inputs.txt").c_str(), "r");
    if (!inl) return 3;
    int id;
    char file[1024];
    while (std::fscanf(inl, "%d %1023s", &id, file) == 2) {
        std::vector<char> raw;
        if (!read_bin(dir + "/" + file, raw)) return 3;
        bufs[id] = as_vec<int32_t>(raw);
    }
    std::fclose(inl);
    FILE *prog = std::fopen((dir + "/program.txt").c_str(), "r");
    if (!prog) return 3;
    char op[32], stem[256];
    long n_out;
    int out_id, nin;
    long long array_cycles = 0;
    while (std::fscanf(prog, "%31s %255s %d %ld %d", op, stem, &out_id, &n_out, &nin) == 5) {
        std::vector<int> ins(nin);
        for (int i = 0; i < nin; i++)
            if (std::fscanf(prog, "%d", &ins[i]) != 1) return 3;
        for (int i : ins)
            if (!bufs.count(i)) {
                std::fprintf(stderr, "call_tb: %s reads buffer %d before it is written\n", stem, i);
                return 3;
            }
        const std::string base = dir + "/" + stem;
        std::map<std::string, long long> kv;
        if (!read_cfg(base + ".cfg", kv)) return 3;
        const std::string o = op;
        buf_t y((size_t)n_out, 0x7eadbeef);
        long long cycles = 0;
        const int32_t *x = bufs[ins[0]].data();
        // a nonlinear unit driven by the op's lookup table (act, lut, softmax); false: the table is missing
        auto lut_unit = [&](int kind, const int32_t *in) {
            std::vector<char> l;
            if (!read_bin(base + ".lut.bin", l)) return false;
            const buf_t lut = as_vec<int32_t>(l);
            unit(kind, kv, n_out, in, nullptr, lut.data(), nullptr, nullptr, y.data());
            return true;
        };
        if (o == "array") {
            std::vector<char> bb, biasb, mfb;
            const LayerCfg c = layer_cfg(kv);
            read_bin(base + ".bias.bin", biasb);
            read_bin(base + ".multf.bin", mfb);
            const int32_t *b;
            if (c.kind == KIND_MATMUL) {
                b = bufs[ins[1]].data();
            } else {
                if (!read_bin(base + ".b.bin", bb)) return 3;
                b = (const int32_t *)bb.data();
            }
            const long seen = run_array_layer(c, x, b, (const int32_t *)biasb.data(), (const float *)mfb.data(), nullptr,
                                              nullptr, (size_t)n_out, y, array_via_top);
            if (seen < 0) {
                std::fprintf(stderr, "call_tb: %s: the design refuses the layer\n", stem);
                return 4;
            }
            cycles = pipeline_cycles(g_counters);
            array_cycles += cycles;
        } else if (o == "gn") {
            std::vector<char> g, bt;
            if (!read_bin(base + ".gamma.bin", g) || !read_bin(base + ".beta.bin", bt)) return 3;
            const buf_t gamma = as_vec<int32_t>(g);
            const std::vector<int64_t> beta = as_vec<int64_t>(bt);
            unit(U_GN, kv, n_out, x, nullptr, nullptr, gamma.data(), beta.data(), y.data());
        } else if (o == "act") {
            if (!lut_unit(U_ACT, x + kv["off"])) return 3;
        } else if (o == "lut") {
            if (!lut_unit(U_LUT, x)) return 3;
        } else if (o == "requant") {
            unit(U_REQUANT, kv, n_out, x + kv["off"], nullptr, nullptr, nullptr, nullptr, y.data());
        } else if (o == "add") {
            unit(U_ADD, kv, n_out, x, bufs[ins[1]].data(), nullptr, nullptr, nullptr, y.data());
        } else if (o == "add_bcast") {
            unit(U_ADD_BCAST, kv, n_out, x, bufs[ins[1]].data(), nullptr, nullptr, nullptr, y.data());
        } else if (o == "softmax") {
            if (!lut_unit(U_SOFTMAX, x)) return 3;
        } else if (o == "upsample") {
            unit(U_UPSAMPLE, kv, n_out, x, nullptr, nullptr, nullptr, nullptr, y.data());
        } else if (o == "permute") {
            unit(U_PERMUTE, kv, n_out, x, nullptr, nullptr, nullptr, nullptr, y.data());
        } else if (o == "concat") {  // channel-major buffers: the producers' outputs placed one after the other
            // (on the board an address offset of the second producer's writes; a copy in this testbench)
            size_t k = 0;
            for (int i : ins)
                for (int32_t v : bufs[i]) {
                    if (k < y.size()) y[k] = v;
                    k++;
                }
        } else {
            std::fprintf(stderr, "call_tb: unknown op %s\n", op);
            return 5;
        }
        std::printf("OP %s cycles=%lld elements=%ld\n", stem, cycles, n_out);
        bufs[out_id].swap(y);
    }
    std::fclose(prog);
    for (auto &kvb : bufs) {
        if (FILE *f = std::fopen((out + "/" + std::to_string(kvb.first) + ".bin").c_str(), "wb")) {
            std::fwrite(kvb.second.data(), 4, kvb.second.size(), f);
            std::fclose(f);
        }
    }
    std::printf("TOTAL array_cycles=%lld buffers=%zu\n", array_cycles, bufs.size());
    return 0;
}
