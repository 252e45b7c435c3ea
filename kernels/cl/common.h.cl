/* Prepended by the host to every program (edgediff.kernels.runtime).
 * T is the storage type of activations and weights: float, or half when the bundle is fp16.
 * Arithmetic is always float: half values are widened on load (vload_half is core OpenCL 1.2,
 * so fp16 storage works on every device); with cl_khr_fp16 (NATIVE_HALF) half buffers are
 * read directly. Biases, norm affines and other small vectors stay float. */
#ifdef USE_HALF
#ifdef NATIVE_HALF
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define LD(p, i) ((float)((p)[(i)]))
#define ST(p, i, v) ((p)[(i)] = convert_half_rte(v))
#else
#define LD(p, i) vload_half((i), (p))
#define ST(p, i, v) vstore_half_rte((v), (i), (p))
#endif
typedef half T;
#else
typedef float T;
#define LD(p, i) ((p)[(i)])
#define ST(p, i, v) ((p)[(i)] = (v))
#endif

inline float silu_f(float v) { return v / (1.0f + exp(-v)); }
