// C-simulation testbench of the nonlinear units: reads VECTOR_DIR/units.txt ("STEM" per line), each
// STEM.cfg (key value) and STEM.*.bin, runs the unit and compares with STEM.expect.bin (fpga/nonlinear.py).
// Prints "STEM mismatches=N total=T" per unit; exit 0 all equal, 1 a mismatch, 3 unreadable vectors.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "nonlinear.h"

template <typename T>
static bool read_vec(const std::string &path, std::vector<T> &v) {
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) return false;
    std::fseek(f, 0, SEEK_END);
    const long n = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    v.resize(n / sizeof(T));
    const bool ok = v.empty() || std::fread(v.data(), sizeof(T), v.size(), f) == v.size();
    std::fclose(f);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 2) return 3;
    const std::string dir = argv[1];
    FILE *list = std::fopen((dir + "/units.txt").c_str(), "r");
    if (!list) return 3;
    int status = 0;
    char stem[256];
    while (std::fscanf(list, "%255s", stem) == 1) {
        const std::string base = dir + "/" + stem;
        std::map<std::string, long long> kv;
        FILE *f = std::fopen((base + ".cfg").c_str(), "r");
        if (!f) return 3;
        char key[64];
        long long val;
        while (std::fscanf(f, "%63s %lld", key, &val) == 2) kv[key] = val;
        std::fclose(f);
        std::vector<int32_t> x, x2, lut, gamma, expect;
        std::vector<int64_t> beta;
        if (!read_vec(base + ".x.bin", x) || !read_vec(base + ".expect.bin", expect)) return 3;
        read_vec(base + ".x2.bin", x2);
        read_vec(base + ".lut.bin", lut);
        read_vec(base + ".gamma.bin", gamma);
        read_vec(base + ".beta.bin", beta);
        std::vector<int32_t> y(expect.size(), 0x7eadbeef);
        const int kind = (int)kv["kind"];
        const int qmin = (int)kv["qmin"], qmax = (int)kv["qmax"];
        if (kind == 0)
            nl_groupnorm(x.data(), (int)kv["zx"], (int)kv["c"], (int)kv["hw"], (int)kv["groups"], kv["eps_n2"],
                         gamma.data(), beta.data(), lut.empty() ? nullptr : lut.data(), kv["my"], (int)kv["zy"], qmin,
                         qmax, y.data());
        else if (kind == 1)
            nl_softmax(x.data(), (int)kv["rows"], (int)kv["len"], kv["ms"], lut.data(), kv["mp"], (int)kv["zy"], qmin,
                       qmax, y.data());
        else if (kind == 2)
            nl_lut(x.data(), (int)x.size(), (int)kv["qmin_in"], lut.data(), y.data());
        else if (kind == 3)
            nl_add(x.data(), x2.data(), (int)x.size(), (int)kv["za"], (int)kv["zb"], kv["ma"], kv["mb"], (int)kv["zy"],
                   qmin, qmax, y.data());
        else if (kind == 4)
            nl_upsample2x(x.data(), (int)kv["c"], (int)kv["h"], (int)kv["w"], y.data());
        if (FILE *yf = std::fopen((base + ".y.bin").c_str(), "wb")) {  // the unit's outputs, for chaining
            std::fwrite(y.data(), 4, y.size(), yf);
            std::fclose(yf);
        }
        long mism = 0;
        for (size_t i = 0; i < y.size(); i++) mism += y[i] != expect[i];
        std::printf("%s mismatches=%ld total=%zu\n", stem, mism, y.size());
        if (mism) status = 1;
    }
    std::fclose(list);
    return status;
}
