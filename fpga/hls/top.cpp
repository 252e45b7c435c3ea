// Synthesis top for Vitis HLS: AXI masters for the operands, AXI-Lite for the layer configuration.
// The C-simulation testbench calls the same function, so what is verified is what gets synthesized.
#include "systolic.h"

void systolic_top(LayerCfg cfg, const int32_t *x, const int32_t *b, const int32_t *bias, const float *mult_f,
                  const int32_t *mult_q, const int32_t *shift, int32_t *y, long long *cycles) {
#pragma HLS INTERFACE m_axi port = x offset = slave bundle = gmem0 depth = 1048576
#pragma HLS INTERFACE m_axi port = b offset = slave bundle = gmem1 depth = 1048576
#pragma HLS INTERFACE m_axi port = bias offset = slave bundle = gmem2 depth = 4096
#pragma HLS INTERFACE m_axi port = mult_f offset = slave bundle = gmem2 depth = 4096
#pragma HLS INTERFACE m_axi port = mult_q offset = slave bundle = gmem2 depth = 4096
#pragma HLS INTERFACE m_axi port = shift offset = slave bundle = gmem2 depth = 4096
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem3 depth = 1048576
#pragma HLS INTERFACE s_axilite port = cfg
#pragma HLS INTERFACE s_axilite port = cycles
#pragma HLS INTERFACE s_axilite port = return
    LayerData d;
    d.x = x;
    d.b = b;
    d.bias = bias;
    d.mult_f = mult_f;
    d.mult_q = mult_q;
    d.shift = shift;
    d.y = y;
    long long count = 0;
    systolic_layer(cfg, d, &count);
    *cycles = count;
}
