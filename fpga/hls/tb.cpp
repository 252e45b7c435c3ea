// Self-checking C-simulation testbench for the systolic array; it also plays the host: it packs each
// layer's operands into the design's memory layouts (systolic.h) and unpacks the outputs.
//
//   tb VECTOR_DIR            reads VECTOR_DIR/layers.txt ("STEM NAME" per line) and for each layer
//                            STEM.cfg (key value lines) and STEM.*.bin (little-endian int32 / float32),
//                            runs the layer on the array and compares every output with STEM.expect.bin
//                            (written by edgediff's bit-accurate simulator, fpga/sim.py).
// Prints one line per layer:
//   "NAME mismatches=N total=T cycles=C load=L compute=X drain=D params=P jobs=J tiles=U words_read=R words_written=W"
// where cycles is the DATAFLOW pipeline's total from the clocks each stage counted (pipeline_cycles) and
// load/compute/drain are the stages' summed clocks; writes the same to VECTOR_DIR/results.txt, and each
// layer's outputs (the expected layout, int32) to STEM.y.bin so a host can chain layers on the design.
// Exit status: 0 all bit-exact, 1 any output mismatch, 3 unreadable vectors, 4 a layer the design refuses.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "host.h"

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
        std::map<std::string, long long> kv;
        if (!read_cfg(base + ".cfg", kv)) {
            std::fprintf(stderr, "tb: cannot read %s.cfg\n", base.c_str());
            return 3;
        }
        const LayerCfg c = layer_cfg(kv);
        std::vector<char> xb, bb, biasb, mfb, mqb, shb, expect;
        if (!read_bin(base + ".x.bin", xb) || !read_bin(base + ".b.bin", bb) || !read_bin(base + ".expect.bin", expect)) {
            std::fprintf(stderr, "tb: missing vectors for %s\n", base.c_str());
            return 3;
        }
        read_bin(base + ".bias.bin", biasb);
        read_bin(base + ".multf.bin", mfb);
        read_bin(base + ".multq.bin", mqb);
        read_bin(base + ".shift.bin", shb);
        const int32_t *x = (const int32_t *)xb.data(), *b = (const int32_t *)bb.data();
        const size_t n_out = expect.size() / 4;
        const int32_t *e = (const int32_t *)expect.data();
        std::vector<int32_t> got;  // the outputs in the expected layout: STEM.y.bin
        const long seen = run_array_layer(c, x, b, (const int32_t *)biasb.data(), (const float *)mfb.data(),
                                          (const int32_t *)mqb.data(), (const int32_t *)shb.data(), n_out, got);
        if (seen < 0) {
            std::fprintf(stderr, "tb: %s: more output-channel tiles than the on-chip parameter banks hold\n", name);
            status = 4;
            continue;
        }
        long mismatches = 0;
        for (size_t i = 0; i < n_out; i++) mismatches += got[i] != e[i];
        if ((size_t)seen != n_out) mismatches += (long)(n_out - (size_t)seen);
        if (FILE *yf = std::fopen((base + ".y.bin").c_str(), "wb")) {  // what the design computed, for chaining
            std::fwrite(got.data(), 4, got.size(), yf);
            std::fclose(yf);
        }
        const StageCounters &s = g_counters;
        long long ls = 0, cs = 0, ds = 0;
        for (long long v : s.load) ls += v;
        for (long long v : s.compute) cs += v;
        for (long long v : s.drain) ds += v;
        char line[2048];
        std::snprintf(line, sizeof line,
                      "%s mismatches=%ld total=%zu cycles=%lld load=%lld compute=%lld drain=%lld params=%lld jobs=%zu "
                      "tiles=%zu words_read=%lld words_written=%lld\n",
                      name, mismatches, n_out, pipeline_cycles(s), ls, cs, ds, s.params, s.load.size(), s.drain.size(),
                      s.words_read, s.words_written);
        std::fputs(line, stdout);
        if (res) std::fputs(line, res);
        if (mismatches) status = 1;
    }
    std::fclose(list);
    if (res) std::fclose(res);
    return status;
}
