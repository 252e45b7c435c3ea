// Synthesis top for Vitis HLS: 128-bit AXI masters for the operands (one bundle each, so A, B and the
// outputs stream concurrently), AXI-Lite for the layer configuration. The C-simulation testbench calls the
// same function, so what is verified is what gets synthesized.
#include "systolic.h"

int systolic_top(LayerCfg cfg, const word_t *x, const word_t *b, const word_t *prm, word_t *y) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 65536 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = b offset = slave bundle = gmem1 depth = 65536 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = prm offset = slave bundle = gmem3 depth = 4096 max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem2 depth = 65536 max_write_burst_length = 64 num_write_outstanding = 16
#pragma HLS INTERFACE s_axilite port = cfg
#pragma HLS INTERFACE s_axilite port = return
    return systolic_layer(cfg, x, b, prm, y);
}
