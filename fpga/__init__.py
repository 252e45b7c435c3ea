"""FPGA target: bit-accurate integer simulator and HLS systolic-array design (edgediff.fpga)."""
