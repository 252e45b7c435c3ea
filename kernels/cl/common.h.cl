/* Prepended by the host to every program (edgediff.kernels.runtime).
 * T is the storage type of activations and weights: float, or half in fp16 bundles.
 * R is the arithmetic type of the cheap per-element work and of the local tiles: half when the
 * device has cl_khr_fp16 (HALF_ARITH: double-rate half ALUs, half the local memory and
 * registers), else float. Reductions and GEMM accumulators are always float (ACC) where
 * accuracy needs it: dot products over thousands of terms, GroupNorm statistics, softmax sums.
 * Without cl_khr_fp16, half storage goes through vload_half/vstore_half (core OpenCL 1.2).
 * VEC is the vector width of elementwise loads (128-bit: 4 floats or 8 halves). */
#ifndef HALF_ARITH
#define HALF_ARITH 0
#endif
#ifndef VEC
#define VEC 4
#endif
#ifndef LOCAL_TILES
#define LOCAL_TILES 1
#endif
typedef float ACC;
#ifdef USE_HALF
typedef half T;
#if HALF_ARITH
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
typedef half R;
#define LD(p, i) ((float)((p)[(i)]))
#define LDR(p, i) ((p)[(i)])
#define ST(p, i, v) ((p)[(i)] = convert_half_rte(v))
#define STR(p, i, v) ((p)[(i)] = (v))
#define VR half8
#define VLD(i, p) vload8((i), (p))
#define VST(v, i, p) vstore8((v), (i), (p))
#define TO_R(v) convert_half(v)
#else
typedef float R;
#define LD(p, i) vload_half((i), (p))
#define LDR(p, i) vload_half((i), (p))
#define ST(p, i, v) vstore_half_rte((v), (i), (p))
#define STR(p, i, v) vstore_half_rte((v), (i), (p))
#define VR float4
#define VLD(i, p) vload_half4((i), (p))
#define VST(v, i, p) vstore_half4_rte((v), (i), (p))
#define TO_R(v) (v)
#endif
#else
typedef float T;
typedef float R;
#define LD(p, i) ((p)[(i)])
#define LDR(p, i) ((p)[(i)])
#define ST(p, i, v) ((p)[(i)] = (v))
#define STR(p, i, v) ((p)[(i)] = (v))
#define VR float4
#define VLD(i, p) vload4((i), (p))
#define VST(v, i, p) vstore4((v), (i), (p))
#define TO_R(v) (v)
#endif

inline float silu_f(float v) { return v / (1.0f + exp(-v)); }
