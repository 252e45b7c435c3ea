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
        const int qmin = (int)kv["qmin"], qmax = (int)kv["qmax"];
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
                                              nullptr, (size_t)n_out, y);
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
            nl_groupnorm(x, (int)kv["zx"], (int)kv["c"], (int)kv["hw"], (int)kv["groups"], kv["eps_n2"], gamma.data(),
                         beta.data(), nullptr, kv["my"], (int)kv["zy"], qmin, qmax, y.data());
        } else if (o == "act") {
            std::vector<char> l;
            if (!read_bin(base + ".lut.bin", l)) return 3;
            const buf_t lut = as_vec<int32_t>(l);
            nl_act_q8(x + kv["off"], (int)n_out, lut.data(), kv["my"], (int)kv["zy"], qmin, qmax, y.data());
        } else if (o == "lut") {
            std::vector<char> l;
            if (!read_bin(base + ".lut.bin", l)) return 3;
            const buf_t lut = as_vec<int32_t>(l);
            nl_lut(x, (int)n_out, (int)kv["qmin_in"], lut.data(), y.data());
        } else if (o == "requant") {
            nl_requant(x + kv["off"], (int)n_out, (int)kv["zx"], kv["m"], (int)kv["zy"], qmin, qmax, y.data());
        } else if (o == "add") {
            nl_add(x, bufs[ins[1]].data(), (int)n_out, (int)kv["za"], (int)kv["zb"], kv["ma"], kv["mb"], (int)kv["zy"],
                   qmin, qmax, y.data());
        } else if (o == "add_bcast") {
            nl_add_bcast(x, bufs[ins[1]].data(), (int)kv["c"], (int)kv["hw"], (int)kv["za"], (int)kv["zb"], kv["ma"],
                         kv["mb"], (int)kv["zy"], qmin, qmax, y.data());
        } else if (o == "softmax") {
            std::vector<char> l;
            if (!read_bin(base + ".lut.bin", l)) return 3;
            const buf_t lut = as_vec<int32_t>(l);
            nl_softmax(x, (int)kv["rows"], (int)kv["len"], kv["ms"], lut.data(), kv["mp"], (int)kv["zy"], qmin, qmax,
                       y.data());
        } else if (o == "upsample") {
            nl_upsample2x(x, (int)kv["c"], (int)kv["h"], (int)kv["w"], y.data());
        } else if (o == "permute") {
            nl_permute3(x, (int)kv["d0"], (int)kv["d1"], (int)kv["d2"], (int)kv["perm"], y.data());
        } else if (o == "concat") {  // channel-major buffers: a concatenation is one after the other in memory
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
