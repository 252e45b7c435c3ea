// Synthesis top for Vitis HLS: 128-bit AXI masters for the operands (one bundle each, so A, B and the
// outputs stream concurrently), AXI-Lite for the layer configuration. The C-simulation testbench calls the
// same function, so what is verified is what gets synthesized.
#include "nonlinear.h"
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

// The whole-call top: the array and the nonlinear units beside it behind one set of AXI-Lite registers. op 0
// runs a layer on the array (the ports above), op 1 one unit on 32-bit code streams (ux, ux2 in, uy out; ulut,
// ugamma, ubeta its constants). The whole-call C-simulation (call_tb.cpp) drives every op through this function.
int edgediff_top(int op, LayerCfg cfg, NlCfg ucfg, const word_t *x, const word_t *b, const word_t *prm, word_t *y,
                 const int32_t *ux, const int32_t *ux2, const int32_t *ulut, const int32_t *ugamma,
                 const int64_t *ubeta, int32_t *uy) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 65536 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = b offset = slave bundle = gmem1 depth = 65536 max_read_burst_length = 64 num_read_outstanding = 16
#pragma HLS INTERFACE m_axi port = prm offset = slave bundle = gmem3 depth = 4096 max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem2 depth = 65536 max_write_burst_length = 64 num_write_outstanding = 16
#pragma HLS INTERFACE m_axi port = ux offset = slave bundle = gmem4 depth = 65536 max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = ux2 offset = slave bundle = gmem5 depth = 65536 max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = ulut offset = slave bundle = gmem6 depth = 4096 max_read_burst_length = 64
#pragma HLS INTERFACE m_axi port = ugamma offset = slave bundle = gmem6 depth = 1024
#pragma HLS INTERFACE m_axi port = ubeta offset = slave bundle = gmem6 depth = 1024
#pragma HLS INTERFACE m_axi port = uy offset = slave bundle = gmem7 depth = 65536 max_write_burst_length = 64
#pragma HLS INTERFACE s_axilite port = op
#pragma HLS INTERFACE s_axilite port = cfg
#pragma HLS INTERFACE s_axilite port = ucfg
#pragma HLS INTERFACE s_axilite port = return
    if (op == 0) return systolic_layer(cfg, x, b, prm, y);
    return nl_unit(ucfg, ux, ux2, ulut, ugamma, ubeta, uy);
}
