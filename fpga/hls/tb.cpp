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

static void set_byte(word_t &wd, int lane, int v) { wd(8 * lane + 7, 8 * lane) = (ap_uint<8>)(v & 0xff); }

static word_t splat_tb(int v) {
    word_t wd = 0;
    for (int l = 0; l < VEC; l++) set_byte(wd, l, v);
    return wd;
}

// rows x cols int32 matrix (row-major, `src` + offset) -> rows x ceil(cols/16) words, padded with `pad`
static void pack_rows(const int32_t *src, long rows, long cols, long row_stride, long col_stride, int pad,
                      std::vector<word_t> &out) {
    const long cw = (cols + VEC - 1) / VEC;
    for (long r = 0; r < rows; r++)
        for (long w = 0; w < cw; w++) {
            word_t wd = splat_tb(pad);
            for (int l = 0; l < VEC; l++) {
                const long c = w * VEC + l;
                if (c < cols) set_byte(wd, l, src[r * row_stride + c * col_stride]);
            }
            out.push_back(wd);
        }
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
        GET(zp_a); GET(zp_b); GET(a_signed); GET(b_signed); GET(has_bias); GET(requant); GET(out_zp); GET(qmin);
        GET(qmax); GET(per_channel);
#undef GET
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
        const bool conv = c.kind == KIND_CONV;
        const int groups = conv ? c.groups : 1;
        const int nrep = conv ? c.n * groups : c.reps;
        const int Kw = k_words(c);
        const int ntiles = (c.N + COLS - 1) / COLS;
        // ---- pack the operands
        std::vector<word_t> xp, bp, pp;
        if (conv) {
            const int cg = c.c / c.groups, og = c.o / c.groups, cgw = (cg + VEC - 1) / VEC;
            for (int img = 0; img < c.n; img++)
                for (int g = 0; g < groups; g++)  // [img][g][h][w][channel words]
                    pack_rows(x + ((long)img * c.c + (long)g * cg) * c.h * c.w, (long)c.h * c.w, cg, 1,
                              (long)c.h * c.w, c.zp_a, xp);
            const int K = cg * c.kh * c.kw;
            for (int o = 0; o < c.o; o++)  // [O][taps][channel words], K walked as (ki, kj, c)
                for (int t = 0; t < c.kh * c.kw; t++)
                    pack_rows(b + (long)o * K + t, 1, cg, 0, (long)c.kh * c.kw, 0, bp);
            (void)og;
        } else if (c.kind == KIND_GEMM) {
            pack_rows(x, c.M, c.K, c.K, 1, c.zp_a, xp);
            pack_rows(b, c.N, c.K, 1, c.N, 0, bp);  // W^T: [N][K words]
        } else {
            for (int r = 0; r < c.reps; r++) {
                pack_rows(x + (long)r * c.M * c.K, c.M, c.K, c.K, 1, c.zp_a, xp);
                pack_rows(b + (long)r * c.K * c.N, c.N, c.K, 1, c.N, c.zp_b, bp);
            }
        }
        const int32_t *bias = (const int32_t *)biasb.data(), *mq = (const int32_t *)mqb.data();
        const int32_t *sh = (const int32_t *)shb.data();
        const float *mf = (const float *)mfb.data();
        for (int g = 0; g < groups; g++)
            for (int t = 0; t < ntiles; t++)
                for (int j = 0; j < COLS; j++) {
                    const int n = t * COLS + j;
                    const long ch = (long)g * c.N + n;
                    word_t wd = 0;
                    if (n < c.N) {
                        const long mi = c.per_channel ? ch : 0;
                        uint32_t bits = 0;
                        if (c.requant == RQ_ORT) std::memcpy(&bits, &mf[mi], 4);
                        if (c.requant == RQ_TFLITE || c.requant == RQ_TFLITE_SINGLE) bits = (uint32_t)mq[mi];
                        wd(31, 0) = (ap_uint<32>)(uint32_t)(c.has_bias ? bias[ch] : 0);
                        wd(63, 32) = (ap_uint<32>)bits;
                        wd(95, 64) = (ap_uint<32>)(uint32_t)(c.requant >= RQ_TFLITE ? sh[mi] : 0);
                    }
                    pp.push_back(wd);
                }
        const int Nw = c.requant != RQ_NONE ? (c.N + VEC - 1) / VEC : (c.N + 3) / 4;
        std::vector<word_t> yp((size_t)nrep * c.M * Nw, splat_tb(0x7e));  // a sentinel for unwritten words
        g_counters.clear();
        if (systolic_top(c, xp.data(), bp.data(), pp.data(), yp.data()) != 0) {
            std::fprintf(stderr, "tb: %s: more output-channel tiles than the on-chip parameter banks hold\n", name);
            status = 4;
            continue;
        }
        // ---- unpack and compare
        const size_t n_out = expect.size() / 4;
        const int32_t *e = (const int32_t *)expect.data();
        long mismatches = 0;
        size_t seen = 0;
        std::vector<int32_t> got(n_out, (int32_t)0x7eadbeef);  // the outputs in the expected layout: STEM.y.bin
        for (int rep = 0; rep < nrep; rep++)
            for (int m = 0; m < c.M; m++)
                for (int n = 0; n < c.N; n++) {
                    const word_t &wd = yp[((size_t)rep * c.M + m) * Nw + (c.requant != RQ_NONE ? n / VEC : n / 4)];
                    int32_t v;
                    if (c.requant != RQ_NONE) {
                        const int lane = n % VEC;
                        const int raw = (int)(unsigned)wd(8 * lane + 7, 8 * lane);
                        v = c.qmin < 0 ? (int32_t)(int8_t)raw : raw;
                    } else {
                        const int lane = n % 4;
                        v = (int32_t)(uint32_t)wd(32 * lane + 31, 32 * lane);
                    }
                    size_t idx;
                    if (conv) {
                        const int img = rep / groups, g = rep % groups;
                        idx = ((size_t)img * c.o + (size_t)g * c.N + n) * c.M + m;
                    } else {
                        idx = ((size_t)rep * c.M + m) * c.N + n;
                    }
                    mismatches += idx >= n_out || v != e[idx];
                    if (idx < n_out) got[idx] = v;
                    seen++;
                }
        if (seen != n_out) mismatches += (long)(seen > n_out ? seen - n_out : n_out - seen);
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
