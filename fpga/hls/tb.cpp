// Self-checking C-simulation testbench for the systolic array.
//
//   tb VECTOR_DIR            reads VECTOR_DIR/layers.txt ("STEM NAME" per line) and for each layer
//                            STEM.cfg (key value lines) and STEM.*.bin (little-endian int32 / float32),
//                            runs the layer on the array and compares every output with STEM.expect.bin
//                            (written by edgediff's bit-accurate simulator, fpga/sim.py).
// Prints one line per layer: "NAME mismatches=N total=T cycles=C model_cycles=E"; writes the same to
// VECTOR_DIR/results.txt. Exit status: 0 all bit-exact and the counted cycles equal the closed-form model,
// 1 any output mismatch, 2 a cycle-count disagreement, 3 unreadable vectors.
#include <cstdio>
#include <cstdlib>
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

static bool read_cfg(const std::string &path, std::map<std::string, long> &kv) {
    FILE *f = std::fopen(path.c_str(), "r");
    if (!f) return false;
    char key[64];
    long val;
    while (std::fscanf(f, "%63s %ld", key, &val) == 2) kv[key] = val;
    std::fclose(f);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s VECTOR_DIR\n", argv[0]);
        return 3;
    }
    const std::string dir = argv[1];
    FILE *list = std::fopen((dir + "/layers.txt").c_str(), "r");
    if (!list) {
        std::fprintf(stderr, "tb: cannot read %s/layers.txt\n", dir.c_str());
        return 3;
    }
    FILE *res = std::fopen((dir + "/results.txt").c_str(), "w");
    int status = 0;
    char stem[256], name[1024];
    while (std::fscanf(list, "%255s %1023s", stem, name) == 2) {
        const std::string base = dir + "/" + stem;
        std::map<std::string, long> kv;
        if (!read_cfg(base + ".cfg", kv)) {
            std::fprintf(stderr, "tb: cannot read %s.cfg\n", base.c_str());
            return 3;
        }
        LayerCfg c;
        std::memset(&c, 0, sizeof c);
#define GET(f) c.f = (int)kv[#f]
        GET(kind); GET(n); GET(c); GET(h); GET(w); GET(o); GET(kh); GET(kw); GET(sh); GET(sw); GET(pt); GET(pl);
        GET(pb); GET(pr); GET(dh); GET(dw); GET(groups); GET(ho); GET(wo); GET(M); GET(K); GET(N); GET(reps);
        GET(zp_a); GET(zp_b); GET(has_bias); GET(requant); GET(out_zp); GET(qmin); GET(qmax); GET(per_channel);
#undef GET
        std::vector<char> x, b, bias, mf, mq, sh, expect;
        if (!read_bin(base + ".x.bin", x) || !read_bin(base + ".b.bin", b) || !read_bin(base + ".expect.bin", expect)) {
            std::fprintf(stderr, "tb: missing vectors for %s\n", base.c_str());
            return 3;
        }
        read_bin(base + ".bias.bin", bias);
        read_bin(base + ".multf.bin", mf);
        read_bin(base + ".multq.bin", mq);
        read_bin(base + ".shift.bin", sh);
        const size_t n_out = expect.size() / 4;
        std::vector<int32_t> y(n_out, (int32_t)0x7eadbeef);  // a sentinel: an output never written mismatches
        long long cycles = 0;
        systolic_top(c, (const int32_t *)x.data(), (const int32_t *)b.data(), (const int32_t *)bias.data(),
                     (const float *)mf.data(), (const int32_t *)mq.data(), (const int32_t *)sh.data(), y.data(), &cycles);
        const int32_t *e = (const int32_t *)expect.data();
        long mismatches = 0;
        for (size_t i = 0; i < n_out; i++) mismatches += (y[i] != e[i]);
        const long long model = systolic_cycles(c.M, c.K, c.N, c.reps);
        std::printf("%s mismatches=%ld total=%zu cycles=%lld model_cycles=%lld\n", name, mismatches, n_out, cycles, model);
        if (res) std::fprintf(res, "%s mismatches=%ld total=%zu cycles=%lld model_cycles=%lld\n", name, mismatches, n_out,
                              cycles, model);
        if (mismatches) status = 1;
        else if (cycles != model && status == 0) status = 2;
    }
    std::fclose(list);
    if (res) std::fclose(res);
    return status;
}
