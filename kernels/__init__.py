"""Mobile GPU kernels: OpenCL C sources and a pyopencl host runtime (edgediff.kernels)."""
