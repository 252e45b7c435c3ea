"""Device profiles and the kernel variants they select.

A `DeviceProfile` is what the runtime knows about an OpenCL device before it compiles anything:
extensions, local memory type and size, work-group limits, compute units, a sub-group size
hint. `select_variants` turns a profile and a bundle precision into the variant switches the .cl
sources read as -D defines (docs/opencl.md, "Variants"). Presets describe an Adreno-class and a
Mali-class GPU from their public OpenCL guides, so that the same rules can be exercised on a
simulator or on PoCL (`CLRuntime(profile="mali-g710")` keeps the real device's limits and takes
the preset's feature bits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgediff.errors import BadInput

# CL_DEVICE_LOCAL_MEM_TYPE values
_LOCAL_TYPES = {1: "local", 2: "global", 0: "none"}

# Feature bits of two mobile GPU families (vendor OpenCL optimisation guides): Adreno has
# dedicated on-chip local memory and 64/128-wide waves; Mali (Valhall) reports CL_GLOBAL local
# memory (it is ordinary cached main memory), 16-wide warps, and the Arm int8 dot product.
PRESETS: dict[str, dict[str, Any]] = {
    "adreno-740": {"vendor": "Qualcomm", "is_gpu": True, "local_mem_type": "local", "sub_group_size": 64,
                   "extensions": frozenset({"cl_khr_fp16", "cl_khr_subgroups", "cl_qcom_dot_product8"}),
                   "correctly_rounded_divide_sqrt": False},
    "mali-g710": {"vendor": "ARM", "is_gpu": True, "local_mem_type": "global", "sub_group_size": 16,
                  "extensions": frozenset({"cl_khr_fp16", "cl_arm_integer_dot_product_int8", "cl_khr_subgroups"}),
                  "correctly_rounded_divide_sqrt": False},
}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    vendor: str
    is_gpu: bool
    extensions: frozenset[str]
    local_mem_type: str  # "local" (dedicated), "global" (emulated in main memory), "none"
    local_mem_size: int
    max_work_group_size: int
    max_work_item_sizes: tuple[int, ...]
    compute_units: int
    sub_group_size: int | None  # None: unknown until a kernel is built (preferred multiple)
    correctly_rounded_divide_sqrt: bool
    opencl_c_version: str = "OpenCL C 1.2"
    preset: str | None = None
    simulated: tuple[str, ...] = field(default=())  # fields taken from the preset, not the device

    @classmethod
    def from_device(cls, dev: Any) -> DeviceProfile:
        import pyopencl as cl

        exts = frozenset(dev.extensions.split())
        sg = None
        if "cl_intel_required_subgroup_size" in exts or "cl_intel_subgroups" in exts:
            sg = 16
        elif dev.vendor.strip().lower().startswith("nvidia"):
            sg = 32
        return cls(name=dev.name.strip(), vendor=dev.vendor.strip(), is_gpu=bool(dev.type & cl.device_type.GPU),
                   extensions=exts, local_mem_type=_LOCAL_TYPES.get(int(dev.local_mem_type), "global"),
                   local_mem_size=int(dev.local_mem_size), max_work_group_size=int(dev.max_work_group_size),
                   max_work_item_sizes=tuple(int(s) for s in dev.max_work_item_sizes),
                   compute_units=int(dev.max_compute_units), sub_group_size=sg,
                   correctly_rounded_divide_sqrt=bool(dev.single_fp_config
                                                      & cl.device_fp_config.CORRECTLY_ROUNDED_DIVIDE_SQRT),
                   opencl_c_version=dev.opencl_c_version.strip())

    def with_preset(self, preset: str) -> DeviceProfile:
        """This device with a preset's layout bits (local memory type, sub-group size, GPU or not):
        how the Mali/Adreno rules are exercised on PoCL or oclgrind. Extensions are never
        simulated: a kernel using half arithmetic or arm_dot() on a device without the extension
        does not compile, so only the preset's extensions the device really has are kept."""
        if preset not in PRESETS:
            raise BadInput(f"OpenCL device profile {preset!r} is unknown; expected one of {', '.join(PRESETS)}")
        p = {k: v for k, v in PRESETS[preset].items() if k in ("is_gpu", "local_mem_type", "sub_group_size")}
        return dataclasses.replace(self, preset=preset, simulated=tuple(sorted(p)), **p)

    def has(self, ext: str) -> bool:
        return ext in self.extensions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extensions"] = sorted(self.extensions)
        d["simulated"] = list(self.simulated)
        return d


@dataclass(frozen=True)
class Variants:
    """The switches every program is built with (as -D defines) and the host-side choices."""

    half_arith: bool  # fp16 bundles on cl_khr_fp16 devices: half tiles and products, float accumulators
    vec: int  # elements per vector load/store in elementwise kernels (vload4/vload8), 1 = scalar
    local_tiles: bool  # local-memory tiling (conv/GEMM, attention K/V); off on Mali-class devices
    int8_dot: str  # "khr", "arm" or "emulated": 4-wide packed int8 dot products in the int8 conv
    groupnorm_split: bool  # GroupNorm statistics split across work-groups (two passes)
    winograd_min_channels: int  # Winograd F(2x2,3x3) for 3x3 convs with Cin, Cout >= this
    build_options: tuple[str, ...]  # compiler options the device supports, checked
    notes: tuple[str, ...] = ()

    def defines(self) -> dict[str, int]:
        return {"HALF_ARITH": int(self.half_arith), "VEC": self.vec, "LOCAL_TILES": int(self.local_tiles),
                "DOT_KHR": int(self.int8_dot == "khr"), "DOT_ARM": int(self.int8_dot == "arm")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# heads wider than this keep only ATTN_D_CHUNK accumulators per work-item (a 64-float accumulator
# plus the query row already fills a mobile GPU's per-thread register budget)
ATTN_SPLIT_ABOVE = 64
ATTN_D_CHUNK = 32


def attention_d_chunk(head_dim: int) -> int:
    if head_dim <= ATTN_SPLIT_ABOVE:
        return head_dim
    for c in (ATTN_D_CHUNK, 40, 20, 16, 8):  # a divisor of head_dim (SD heads: 40, 80, 160)
        if head_dim % c == 0:
            return c
    return ATTN_D_CHUNK  # the last chunk is partial; the kernel guards it


def attention_bytes(B: int, heads: int, d: int, N: int, M: int, es: int = 2, bq: int = 64,
                    dc: int | None = None) -> dict[str, dict[str, int]]:
    """Flash (attention.cl: q once, K and V once per BQ-query work-group, o once; with head_dim
    tiling, q and K once per chunk and the QK FLOPs recomputed per chunk) vs unfused
    (S = Q^T K written, softmax reading it twice and writing P, O = V P^T reading P).
    dc: output channels per flash work-item (default: the GPU rule, device.attention_d_chunk)."""
    bh = B * heads
    qblocks = -(-N // bq)
    nch = -(-d // (dc or attention_d_chunk(d)))  # head_dim-tiled: Q and K are read once per channel chunk
    flops = bh * (2 * nch + 2) * N * M * d
    fused = {"reads": bh * (nch * N * d + qblocks * (nch + 1) * M * d) * es, "writes": bh * N * d * es,
             "flops": flops, "launches": 1}
    s = bh * N * M * es
    unfused = {"reads": bh * (N * d + M * d) * es + 2 * s + s + bh * M * d * es, "writes": s + s + bh * N * d * es,
               "flops": bh * 4 * N * M * d, "launches": 3}
    return {"fused": fused, "unfused": unfused}


def select_variants(p: DeviceProfile, precision: str) -> Variants:
    notes = []
    half = precision == "fp16"
    half_arith = half and p.has("cl_khr_fp16")
    # 128-bit accesses: 4 floats or 8 halves (vendors' guides: Adreno and Mali both prefer 128-bit loads)
    vec = 8 if half_arith else 4
    # CPU drivers (PoCL) report CL_GLOBAL too, but there the tiles live in the CPU caches and the
    # tiled kernels are the measured-faster ones; only GPUs without on-chip local memory skip them
    local_tiles = p.local_mem_type == "local" or not p.is_gpu
    if not local_tiles:
        notes.append(f"{p.name}: local memory is {p.local_mem_type} memory: convs/GEMMs and attention read global "
                     "memory through the cache (no local tiles)")
    if p.has("cl_khr_integer_dot_product"):
        dot = "khr"
    elif p.has("cl_arm_integer_dot_product_int8"):
        dot = "arm"
    else:
        dot = "emulated"
    opts = []
    if p.correctly_rounded_divide_sqrt:
        opts.append("-cl-fp32-correctly-rounded-divide-sqrt")
    else:
        notes.append(f"{p.name}: no correctly rounded fp32 divide: int8 quantization divides may differ from the host "
                     "in the last bit, moving a value one quantization step at a rounding boundary")
    # Winograd trades 2.25x fewer MACs for the V/M temporaries (4x the input and output bytes):
    # worth it only where the device's compute, not its bandwidth, bounds a 3x3 conv. GPUs with
    # dedicated local memory (the GEMM tiles are cheap) break even from 64 channels, Mali-class
    # from 128 (every tile access is a cache access), CPUs (PoCL) from 32 (measured here).
    wmin = 32 if not p.is_gpu else (64 if local_tiles else 128)
    return Variants(half_arith=half_arith, vec=vec, local_tiles=local_tiles, int8_dot=dot, groupnorm_split=True,
                    winograd_min_channels=wmin, build_options=tuple(opts), notes=tuple(notes))
