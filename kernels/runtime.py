"""pyopencl host runtime: device choice, program builds, work-group sizes, and one method per kernel.

Every op takes and returns `pyopencl.array.Array`s (NCHW, storage dtype float32 or float16) and
queues its kernel; nothing is read back until the caller asks. A device profile
(edgediff.kernels.device) selects the kernel variants (half arithmetic, vector width, local
tiles or not, int8 dot products, checked build options); work-group sizes come from the device's
limits and from each compiled kernel's CL_KERNEL_WORK_GROUP_SIZE and preferred multiple, never
from constants tuned for one GPU. A device without cl_khr_fp16 still runs fp16 bundles: half
storage through vload_half/vstore_half (core OpenCL 1.2) with float arithmetic, and the runtime
says so in `notes`. With profiling=True every kernel's event is kept and `event_times()` reads
its CL_PROFILING_COMMAND_START/END timestamps.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

import numpy as np

from edgediff.errors import BadInput, Unavailable

PROGRAMS = ("elementwise", "norm", "softmax", "attention", "conv", "winograd", "int8", "transformer")
INSTALL_HINT = "pip install 'edgediff[opencl]' (pyopencl and pocl-binary-distribution, a CPU OpenCL driver)"

# Winograd F(2x2, 3x3) weight transform G (Lavin & Gray 2016)
_WG = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def _cl() -> Any:
    try:
        import pyopencl as cl
    except ImportError:
        raise Unavailable(f"OpenCL runtime needs pyopencl: {INSTALL_HINT}") from None
    return cl


def list_devices() -> list[Any]:
    """Every OpenCL device on every platform (empty when there is no platform or no ICD)."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except Exception:  # pyopencl raises LogicError/RuntimeError when no ICD is installed
        return []
    out = []
    for p in platforms:
        try:
            out.extend(p.get_devices())
        except Exception:
            continue
    return out


def opencl_available() -> tuple[bool, str]:
    try:
        devs = list_devices()
    except Unavailable as e:
        return False, str(e)
    if not devs:
        return False, f"no OpenCL platform/device found; {INSTALL_HINT}"
    return True, f"{len(devs)} OpenCL device(s): " + ", ".join(d.name.strip() for d in devs)


def pick_device(name: str | None = None) -> Any:
    """The device to run on: `name` (or $EDGEDIFF_OPENCL_DEVICE) as a substring, else the first GPU,
    else the first device of any kind."""
    cl = _cl()
    devs = list_devices()
    if not devs:
        raise Unavailable(f"no OpenCL platform/device found; {INSTALL_HINT}")
    name = name or os.environ.get("EDGEDIFF_OPENCL_DEVICE")
    if name:
        hits = [d for d in devs if name.lower() in (d.name + " " + d.platform.name).lower()]
        if not hits:
            raise BadInput(f"OpenCL device {name!r} not found; available: {', '.join(d.name.strip() for d in devs)}")
        return hits[0]
    # a simulator (oclgrind, which reports itself as a GPU) runs kernels thousands of times slower:
    # only when asked for by name
    real = [d for d in devs if "oclgrind" not in (d.name + d.platform.name).lower()] or devs
    gpus = [d for d in real if d.type & cl.device_type.GPU]
    return (gpus or real)[0]


def kernel_source(name: str) -> str:
    base = resources.files("edgediff.kernels") / "cl"
    return (base / "common.h.cl").read_text() + "\n" + (base / f"{name}.cl").read_text()


def kernel_sources() -> dict[str, str]:
    """The .cl files (without the common header), as shipped in a bundle."""
    base = resources.files("edgediff.kernels") / "cl"
    names = ["common.h", *PROGRAMS]
    return {f"{n}.cl": (base / f"{n}.cl").read_text() for n in names}


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def weight_sums(wq: np.ndarray, split: int) -> np.ndarray:
    """int32 (Co, 2): each output channel's int8 weight sum over input channels [0, split) and [split, Ci)."""
    w = np.asarray(wq).astype(np.int64)
    return np.stack([w[:, :split].sum(axis=(1, 2, 3)), w[:, split:].sum(axis=(1, 2, 3))], 1).astype(np.int32)


def winograd_weights(w: np.ndarray) -> np.ndarray:
    """U[e, co, ci] = (G g G^T)[e // 4, e % 4] for a (Co, Ci, 3, 3) weight, in float64 then float32."""
    u = np.einsum("ik,ockl,jl->ijoc", _WG, w.astype(np.float64), _WG)  # (4, 4, Co, Ci)
    return u.reshape(16, w.shape[0], w.shape[1]).astype(np.float32)


class CLRuntime:
    """One OpenCL context + queue, the compiled programs, and the kernels as methods."""

    def __init__(self, device: Any = None, precision: str = "fp32", profiling: bool = False,
                 sources: dict[str, str] | None = None, profile: Any = None) -> None:
        if precision not in ("fp32", "fp16"):
            raise BadInput(f"OpenCL runtime precision must be fp32 or fp16, got {precision!r}")
        cl = _cl()
        import pyopencl.array  # noqa: F401  (registers cl.array)
        import pyopencl.tools

        self.cl = cl
        self.sources = sources  # a bundle's own .cl files (name.cl -> text); else the package's
        self.device = device if device is not None and not isinstance(device, str) else pick_device(device)
        self.ctx = cl.Context([self.device])
        props = cl.command_queue_properties.PROFILING_ENABLE if profiling else 0
        self.queue = cl.CommandQueue(self.ctx, properties=props)
        self.pool = pyopencl.tools.MemoryPool(pyopencl.tools.ImmediateAllocator(self.queue))
        self.precision = precision
        self.half = precision == "fp16"
        self.dtype = np.float16 if self.half else np.float32
        self.notes: list[str] = []
        self.profiling = profiling
        self.events: list[tuple[str, str, Any]] = []  # (label, kernel, event) of every kernel queued while profiling
        self.label = ""  # what the executor is running (the model's module name), for event_times
        from edgediff.kernels.device import DeviceProfile, select_variants

        prof = profile if profile is not None else os.environ.get("EDGEDIFF_OPENCL_PROFILE") or None
        self.profile = DeviceProfile.from_device(self.device)
        if isinstance(prof, str):
            self.profile = self.profile.with_preset(prof)
        elif prof is not None:
            self.profile = prof
        self.variants = select_variants(self.profile, precision)
        self.notes.extend(self.variants.notes)
        self.native_half = self.profile.has("cl_khr_fp16")
        if self.half and not self.native_half:
            self.notes.append(f"{self.device.name.strip()} lacks cl_khr_fp16: fp16 runs as half storage "
                              "(vload_half/vstore_half) with fp32 arithmetic")
        self._kinfo: dict[Any, tuple[int, int]] = {}
        self._wsum: dict[tuple[int, int], Any] = {}
        # work-group limits
        self.max_wg = int(self.device.max_work_group_size)
        sizes = list(self.device.max_work_item_sizes)
        self.local_mem = int(self.device.local_mem_size)
        ts = 16
        while ts > 1 and (ts * ts > self.max_wg or ts > sizes[0] or ts > sizes[1] or 2 * ts * (ts + 1) * 4 > self.local_mem):
            ts //= 2
        self.ts = ts  # square tile edge and (TS, TS) work-group of the simple tiled int8 GEMM
        # register-blocked float GEMM/conv: (WG, WG) work-items, each RB x RB outputs, K steps of TK
        # GPUs want many work-items per group (8x8 x 4x4 outputs); CPU drivers (PoCL) run a work-group
        # as loops on one core and do better with fewer, fatter work-items (4x4 x 8x8; measured).
        is_gpu = bool(self.device.type & cl.device_type.GPU)
        wg, rb = (8, 4) if is_gpu else (4, 8)
        while wg > 1 and (wg * wg > self.max_wg or wg > sizes[0] or wg > sizes[1]
                          or 2 * 16 * wg * rb * 4 > self.local_mem):
            wg //= 2
        self.gemm_wg, self.gemm_rb, self.gemm_tk = wg, rb, 16
        if not self.variants.local_tiles:
            self.gemm_rb = 4  # no tiles: each work-item a 4 x 4 block read from global memory
        self.gemm_block = wg * rb
        self.wg1d = _pow2_floor(min(256, self.max_wg, sizes[0]))  # elementwise and reduction work-groups
        self._programs: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self._kernels: dict[tuple[Any, str], Any] = {}
        self._dummy = self.empty((1,))

    # ------------------------------------------------------------------ plumbing
    def describe(self) -> dict[str, Any]:
        d = self.device
        return {"device": d.name.strip(), "platform": d.platform.name.strip(), "version": d.version.strip(),
                "max_work_group_size": self.max_wg, "local_mem_size": self.local_mem,
                "gemm_workgroup": [self.gemm_wg, self.gemm_wg], "gemm_block": self.gemm_block,
                "cl_khr_fp16": self.native_half, "precision": self.precision, "profile": self.profile.to_dict(),
                "variants": self.variants.to_dict(), "notes": list(self.notes)}

    def build_options(self, name: str, defines: dict[str, Any]) -> list[str]:
        """-D defines of the variant plus the compiler options this device supports (checked)."""
        defs = {**self.variants.defines(), **defines}
        if not self.half:
            defs["HALF_ARITH"] = 0
        if self.half:
            defs["VEC"] = 8 if defs["HALF_ARITH"] else 4
        else:
            defs["VEC"] = 4
        opts = [f"-D{k}={v}" for k, v in sorted(defs.items())]
        if self.half:
            opts.append("-DUSE_HALF=1")
        if name == "int8" or "OT" in defines:  # quantizing kernels divide by the scale as the host does
            opts.extend(o for o in self.variants.build_options if o == "-cl-fp32-correctly-rounded-divide-sqrt")
            if self.variants.int8_dot == "khr" and self.profile.opencl_c_version.split()[2:3] >= ["3.0"]:
                opts.append("-cl-std=CL3.0")  # the Khronos dot() builtins are OpenCL C 3.0 features
        return opts

    def kernel_limits(self, k: Any) -> tuple[int, int]:
        """(CL_KERNEL_WORK_GROUP_SIZE, CL_KERNEL_PREFERRED_WORK_GROUP_SIZE_MULTIPLE) of a built kernel:
        what this kernel, with its register use, can launch with on this device."""
        got = self._kinfo.get(k)
        if got is None:
            cl = self.cl
            wg = int(k.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device))
            try:
                mult = int(k.get_work_group_info(cl.kernel_work_group_info.PREFERRED_WORK_GROUP_SIZE_MULTIPLE,
                                                 self.device))
            except cl.Error:
                mult = 1
            got = self._kinfo[k] = (max(1, min(wg, self.max_wg)), max(1, mult))
        return got

    def local_1d(self, k: Any, n: int, cap: int = 256) -> int:
        """A 1-D work-group size for `k` over n work-items: a power of two <= the kernel's limit,
        at least the preferred multiple where n allows."""
        wg, _ = self.kernel_limits(k)
        return max(1, min(_pow2_floor(min(wg, cap, int(self.device.max_work_item_sizes[0]))), _pow2_floor(max(n, 1))))

    def event_times(self, clear: bool = True) -> list[tuple[str, str, float]]:
        """(label, kernel name, ms from CL_PROFILING_COMMAND_START to _END) of every kernel queued since
        the last call; the queue must have finished."""
        out = []
        for label, kname, ev in self.events:
            ev.wait()
            out.append((label, kname, (ev.profile.end - ev.profile.start) * 1e-6))
        if clear:
            self.events = []
        return out

    def program(self, name: str, **defines: Any) -> Any:
        defs = dict(defines)
        defs.setdefault("TS", self.ts)
        key = (name, tuple(sorted(defs.items())))
        prg = self._programs.get(key)
        if prg is None:
            opts = self.build_options(name, defs)
            try:
                src = (self.sources["common.h.cl"] + "\n" + self.sources[f"{name}.cl"]) if self.sources else kernel_source(name)
                prg = self.cl.Program(self.ctx, src).build(options=opts)
            except self.cl.RuntimeError as e:  # a kernel that does not compile is our bug: show the log
                raise RuntimeError(f"OpenCL build of {name}.cl failed on {self.device.name.strip()}: {e}") from None
            self._programs[key] = prg
        return prg

    def kernel(self, name: str, kname: str, **defines: Any) -> Any:
        if name == "conv":
            defines = {"WG": self.gemm_wg, "RB": self.gemm_rb, "TK": self.gemm_tk, **defines}
        if name == "int8":
            defines = {"QT_SIGNED": int(defines.get("QT", "char") == "char"), **defines}
        prg = self.program(name, **defines)
        k = self._kernels.get((prg, kname))
        if k is None:
            k = self._kernels[(prg, kname)] = self.cl.Kernel(prg, kname)
            if name == "conv" and self.variants.local_tiles and self.gemm_wg > 1 \
                    and self.kernel_limits(k)[0] < self.gemm_wg ** 2:
                # this kernel's registers do not allow WG x WG work-items here: rebuild smaller
                self.gemm_wg //= 2
                self.gemm_block = self.gemm_wg * self.gemm_rb
                self.notes.append(f"{kname}: CL_KERNEL_WORK_GROUP_SIZE {self.kernel_limits(k)[0]} < the tile's "
                                  f"work-group; using {self.gemm_wg}x{self.gemm_wg}")
                return self.kernel(name, kname, **{k2: v for k2, v in defines.items() if k2 != "WG"})
        return k

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.cl.array.empty(self.queue, tuple(int(s) for s in shape), dtype or self.dtype, allocator=self.pool)

    def to_device(self, a: Any, dtype: Any = None) -> Any:
        """Upload a numpy array or torch tensor (cast to the storage dtype unless `dtype` says otherwise)."""
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(a, dtype=dtype or self.dtype)
        return self.cl.array.to_device(self.queue, a, allocator=self.pool)

    def finish(self) -> None:
        self.queue.finish()

    def _run(self, k: Any, gsize: tuple[int, ...], lsize: tuple[int, ...] | None, *args: Any) -> Any:
        if lsize is not None:
            gsize = tuple(-(-g // ls) * ls for g, ls in zip(gsize, lsize))
        ev = k(self.queue, gsize, lsize, *[a.data if hasattr(a, "data") and hasattr(a, "queue") else a for a in args])
        if self.profiling:
            self.events.append((self.label, k.function_name, ev))
        return ev

    def _gemm_grid(self, M: int, N: int, batch: int, k: Any = None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        if not self.variants.local_tiles:  # one 4x4 block per work-item, a 1-D work-group along N
            rb = self.gemm_rb
            gn = -(-N // rb)
            return (gn, -(-M // rb), batch), (self.local_1d(k, gn, 64) if k is not None else 1, 1, 1)
        bl, wg = self.gemm_block, self.gemm_wg
        return (-(-N // bl) * wg, -(-M // bl) * wg, batch), (wg, wg, 1)

    def _ew(self, n: int, k: Any = None) -> tuple[tuple[int], tuple[int]]:
        if k is not None:
            return (n,), (self.local_1d(k, n, self.wg1d),)
        return (n,), (min(self.wg1d, _pow2_floor(n)),)

    def _vec(self) -> int:
        return 8 if (self.half and self.variants.half_arith) else 4

    def _ewv(self, kname: str, n: int, *args: Any) -> Any:
        """A vectorised elementwise kernel: ceil(n / VEC) work-items, VEC elements each."""
        k = self.kernel("elementwise", kname)
        nv = -(-n // self._vec())
        return self._run(k, *self._ew(nv, k), *args)

    # ------------------------------------------------------------------ elementwise
    def silu(self, x: Any) -> Any:
        y = self.empty(x.shape)
        self._ewv("silu", x.size, x, y, np.int32(x.size))
        return y

    def gelu(self, x: Any) -> Any:
        y = self.empty(x.shape)
        self._ewv("gelu", x.size, x, y, np.int32(x.size))
        return y

    def add(self, a: Any, b: Any, scale: float = 1.0) -> Any:
        if a.shape != b.shape:
            raise ValueError(f"add: shapes differ {a.shape} vs {b.shape}")
        y = self.empty(a.shape)
        self._ewv("add", a.size, a, b, y, np.int32(a.size), np.float32(scale))
        return y

    def affine(self, a: Any, alpha: float, beta: float) -> Any:
        y = self.empty(a.shape)
        self._ewv("affine", a.size, a, y, np.int32(a.size), np.float32(alpha), np.float32(beta))
        return y

    def concat(self, a: Any, b: Any) -> Any:
        """Channel concat of (B, Ca, H, W) and (B, Cb, H, W)."""
        B, ca = a.shape[:2]
        cb = b.shape[1]
        hw = int(np.prod(a.shape[2:]))
        y = self.empty((B, ca + cb, *a.shape[2:]))
        self._run(self.kernel("elementwise", "concat_channels"), *self._ew(y.size), a, b, y, np.int32(ca), np.int32(cb),
                  np.int32(hw), np.int32(y.size))
        return y

    def upsample2x(self, x: Any) -> Any:
        B, C, H, W = x.shape
        y = self.empty((B, C, 2 * H, 2 * W))
        self._run(self.kernel("elementwise", "upsample_nearest2x"), *self._ew(y.size), x, y, np.int32(H), np.int32(W),
                  np.int32(y.size))
        return y

    def timestep_embedding(self, t: Any, freqs: Any, dim: int, flip: bool) -> Any:
        """t: float32 (B,) on the device; freqs: float32 (dim // 2,) from the host."""
        B = t.shape[0]
        y = self.empty((B, dim, 1, 1))
        self._run(self.kernel("elementwise", "timestep_embedding"), *self._ew(y.size), t, freqs, y,
                  np.int32(freqs.shape[0]), np.int32(dim), np.int32(1 if flip else 0), np.int32(y.size))
        return y

    def gelu_tanh(self, x: Any) -> Any:
        y = self.empty(x.shape)
        self._ewv("gelu_tanh", x.size, x, y, np.int32(x.size))
        return y

    # ------------------------------------------------------------------ transformer blocks (channels-first tokens)
    def layer_norm_channels(self, x: Any, gamma: Any | None, beta: Any | None, eps: float, mod: Any | None = None,
                            scale_off: int = 0, shift_off: int = 0, store: dict[str, Any] | None = None) -> Any:
        """LayerNorm over the channels of each position of x (B, C, ...): [* gamma + beta] (affine), then
        [* (1 + mod[b, scale_off + c]) + mod[b, shift_off + c]] with mod (B, K, ...) (adaLN). store: an
        integer layer's input grid to write int8/uint8 on instead of float (int8 bundles)."""
        B, C = x.shape[:2]
        N = int(np.prod(x.shape[2:]))
        odt, sargs = self._store_args(store)
        y = self.empty(x.shape, None if store is None else odt)
        flags = (1 if gamma is not None else 0) | (2 if mod is not None else 0)
        d = self._dummy
        ms = int(np.prod(mod.shape[1:])) if mod is not None else 0
        if store is None:
            k, extra = self.kernel("transformer", "layer_norm_channels"), []
        else:
            k, extra = self.kernel("transformer", "layer_norm_channels_q", OT=self._qt(odt)), sargs
        dummy32 = self._dummy32()
        self._run(k, *self._ew(B * N, k), x, gamma if gamma is not None else dummy32,
                  beta if beta is not None else dummy32, mod if mod is not None else d, y, np.int32(C), np.int32(N),
                  np.int32(B * N), np.float32(eps), np.int32(flags), np.int32(ms), np.int32(scale_off),
                  np.int32(shift_off), *extra)
        return y

    def _dummy32(self) -> Any:
        got = getattr(self, "_d32", None)
        if got is None:
            got = self._d32 = self.empty((1,), np.float32)
        return got

    def geglu(self, x: Any, store: dict[str, Any] | None = None) -> Any:
        """x (B, 2F, ...) -> value * gelu(gate), (B, F, ...); float, or int8/uint8 on `store`'s grid."""
        B, C2 = x.shape[:2]
        if C2 % 2:
            raise ValueError(f"geglu: {C2} channels is odd")
        odt, sargs = self._store_args(store)
        y = self.empty((B, C2 // 2, *x.shape[2:]), None if store is None else odt)
        if store is None:
            k, extra = self.kernel("transformer", "geglu"), []
        else:
            k, extra = self.kernel("transformer", "geglu_q", OT=self._qt(odt)), sargs
        self._run(k, *self._ew(y.size, k), x, y, np.int32(y.size // B), np.int32(y.size), *extra)
        return y

    def gate_residual(self, x: Any, res: Any, mod: Any, off: int) -> Any:
        """res + mod[b, off + c] * x over (B, C, ...)."""
        B, C = x.shape[:2]
        N = int(np.prod(x.shape[2:]))
        y = self.empty(x.shape)
        k = self.kernel("transformer", "gate_residual")
        self._run(k, *self._ew(y.size, k), x, res, mod, y, np.int32(C), np.int32(N),
                  np.int32(int(np.prod(mod.shape[1:]))), np.int32(off), np.int32(y.size))
        return y

    def add_broadcast(self, x: Any, p: Any) -> Any:
        """x (B, ...) + p (...), p broadcast over the batch."""
        y = self.empty(x.shape)
        k = self.kernel("transformer", "add_broadcast")
        self._run(k, *self._ew(y.size, k), x, p, y, np.int32(p.size), np.int32(y.size))
        return y

    def embedding_rows(self, labels: Any, table: Any) -> Any:
        """labels int32 (B,) on the device, table (rows, D) -> (B, D, 1, 1)."""
        B, D = labels.shape[0], table.shape[1]
        y = self.empty((B, D, 1, 1))
        k = self.kernel("transformer", "embedding_rows")
        self._run(k, *self._ew(y.size, k), labels, table, y, np.int32(D), np.int32(y.size))
        return y

    def unpatchify(self, x: Any, patch: int, out_channels: int) -> Any:
        """(B, P*P*Co, h, w) -> (B, Co, h*P, w*P), DiT's feature order (P, P, Co)."""
        B, F, h, w = x.shape
        if F != patch * patch * out_channels:
            raise ValueError(f"unpatchify: {F} features != {patch}^2 x {out_channels}")
        y = self.empty((B, out_channels, h * patch, w * patch))
        k = self.kernel("transformer", "unpatchify")
        self._run(k, *self._ew(y.size, k), x, y, np.int32(patch), np.int32(out_channels), np.int32(h), np.int32(w),
                  np.int32(y.size))
        return y

    # ------------------------------------------------------------------ normalisation, softmax
    def _reduce_local(self, n: int) -> int:
        return max(1, min(self.wg1d, _pow2_floor(n)))

    def group_norm(self, x: Any, gamma: Any, beta: Any, groups: int, eps: float, silu: bool = False) -> Any:
        B, C = x.shape[:2]
        if C % groups:
            raise ValueError(f"group_norm: {C} channels not divisible by {groups} groups")
        hw = int(np.prod(x.shape[2:]))
        y = self.empty(x.shape)
        n = (C // groups) * hw
        S = self.group_norm_splits(B * groups, n)
        if S > 1:
            return self.group_norm_split(x, gamma, beta, groups, eps, silu, S)
        k = self.kernel("norm", "group_norm")
        L = self.local_1d(k, n)
        loc = self.cl.LocalMemory(4 * L)
        self._run(k, (B * groups * L,), (L,), x, gamma, beta, y, np.int32(C), np.int32(hw),
                  np.int32(groups), np.float32(eps), np.int32(1 if silu else 0), loc, self.cl.LocalMemory(4 * L),
                  self.cl.LocalMemory(4 * L))
        return y

    def group_norm_splits(self, n_groups: int, n: int) -> int:
        """Work-groups per (batch, group): enough that every compute unit has 4 work-groups, each
        chunk still at least 256 elements (1 when the variant is off)."""
        if not self.variants.groupnorm_split:
            return 1
        want = -(-4 * max(1, self.profile.compute_units) // max(1, n_groups))
        return int(max(1, min(want, n // 256, 64)))

    def group_norm_split(self, x: Any, gamma: Any, beta: Any, groups: int, eps: float, silu: bool, S: int) -> Any:
        """GroupNorm (+SiLU) as two passes over B x groups x S work-groups (see norm.cl)."""
        B, C = x.shape[:2]
        hw = int(np.prod(x.shape[2:]))
        n = (C // groups) * hw
        part = self.empty((B * groups * S * 3,), np.float32)
        k1, k2 = self.kernel("norm", "group_partial_stats"), self.kernel("norm", "group_norm_split_apply")
        L = self.local_1d(k1, -(-n // S))
        lm = [self.cl.LocalMemory(4 * L) for _ in range(3)]
        self._run(k1, (B * groups * S * L,), (L,), x, part, np.int32(C), np.int32(hw), np.int32(groups), np.int32(S), *lm)
        y = self.empty(x.shape)
        L2 = self.local_1d(k2, -(-n // S))
        self._run(k2, (B * groups * S * L2,), (L2,), x, part, gamma, beta, y, np.int32(C), np.int32(hw),
                  np.int32(groups), np.int32(S), np.float32(eps), np.int32(1 if silu else 0))
        return y

    def group_norm_unfused(self, x: Any, gamma: Any, beta: Any, groups: int, eps: float, silu: bool = False) -> Any:
        """Baseline for the benchmark: statistics kernel, normalise kernel, SiLU kernel."""
        B, C = x.shape[:2]
        hw = int(np.prod(x.shape[2:]))
        stats = self.empty((B * groups * 2,), np.float32)
        L = self._reduce_local((C // groups) * hw)
        self._run(self.kernel("norm", "group_stats"), (B * groups * L,), (L,), x, stats, np.int32(C), np.int32(hw),
                  np.int32(groups), np.float32(eps), self.cl.LocalMemory(4 * L), self.cl.LocalMemory(4 * L))
        y = self.empty(x.shape)
        self._run(self.kernel("norm", "group_norm_apply"), *self._ew(x.size), x, stats, gamma, beta, y, np.int32(C),
                  np.int32(hw), np.int32(groups), np.int32(x.size))
        return self.silu(y) if silu else y

    def softmax(self, x: Any) -> Any:
        """Row softmax over the last axis."""
        ncols = x.shape[-1]
        rows = x.size // ncols
        y = self.empty(x.shape)
        L = self._reduce_local(ncols)
        self._run(self.kernel("softmax", "softmax_rows"), (rows * L,), (L,), x, y, np.int32(ncols),
                  self.cl.LocalMemory(4 * L), self.cl.LocalMemory(4 * L))
        return y

    # ------------------------------------------------------------------ attention
    def attention_tiles(self, head_dim: int) -> tuple[int, int]:
        """(BQ queries per work-group, BKV keys per tile) for this device: K and V tiles must fit in
        half the local memory (the rest is left for the runtime/other work-groups)."""
        esize = 2 if (self.half and self.variants.half_arith) else 4
        bkv = 64 if self.variants.local_tiles else 16  # without tiles BKV only sizes the score buffer
        while bkv > 1 and 2 * bkv * head_dim * esize > self.local_mem // 2:
            bkv //= 2
        bq = _pow2_floor(min(64, self.max_wg, int(self.device.max_work_item_sizes[0])))
        return bq, bkv

    def flash_attention(self, q: Any, k: Any, v: Any, heads: int, head_dim: int, n: int, m: int,
                        q_off: int = 0, k_off: int = 0, v_off: int = 0, scale: float | None = None,
                        q_bstride: int | None = None, kv_bstride: int | None = None, d_chunk: int | None = None) -> Any:
        """Channels-first multi-head attention: q (B, *, N) with head h, channel j at row q_off + h*D + j.
        Returns o (B, heads*D, N). d_chunk: output channels per work-group (default: the device rule,
        head_dim up to 64 unsplit)."""
        B = q.shape[0]
        C = heads * head_dim
        q_bstride = q_bstride if q_bstride is not None else int(np.prod(q.shape[1:]))
        kv_bstride = kv_bstride if kv_bstride is not None else int(np.prod(k.shape[1:]))
        o = self.empty((B, C, n))
        bq, bkv = self.attention_tiles(head_dim)
        from edgediff.kernels.device import attention_d_chunk

        # head_dim tiling exists for GPU register files; on a CPU driver (PoCL) the per-work-item
        # arrays live in cache and the recomputed scores cost 6-8x at d 160-256 (measured): unsplit
        dc = (attention_d_chunk(head_dim) if self.profile.is_gpu else head_dim) if d_chunk is None else int(d_chunk)
        nch = -(-head_dim // dc)
        knl = self.kernel("attention", "flash_attention", HEAD_DIM=head_dim, BKV=bkv, DC=dc)
        bq = min(bq, self.kernel_limits(knl)[0], _pow2_floor(n))
        s = scale if scale is not None else head_dim**-0.5
        es = 2 if (self.half and self.variants.half_arith) else 4
        self._run(knl, (n, B * heads * nch), (bq, 1), q, k, v, o, np.int32(n), np.int32(m), np.int32(heads),
                  np.int32(q_bstride), np.int32(kv_bstride), np.int32(C * n), np.int32(q_off), np.int32(k_off),
                  np.int32(v_off), np.float32(s), self.cl.LocalMemory(es * bkv * head_dim),
                  self.cl.LocalMemory(es * bkv * dc))
        return o

    def attention_path(self, batch: int, heads: int, head_dim: int, n: int, m: int, copied: int = 0) -> str:
        """"flash" or "unfused" for this shape on this device: whichever moves fewer global bytes in the
        cost model (device.attention_bytes, kernels/cost.py's attention; this device's head_dim chunk and query block),
        the unfused side charged `copied` elements for slicing its operands out of a stacked buffer."""
        from edgediff.kernels.device import attention_bytes, attention_d_chunk

        es = 2 if self.half else 4
        dc = attention_d_chunk(head_dim) if self.profile.is_gpu else head_dim
        c = attention_bytes(batch, heads, head_dim, n, m, es, bq=self.attention_tiles(head_dim)[0], dc=dc)
        moved = {k: v["reads"] + v["writes"] for k, v in c.items()}
        return "unfused" if moved["unfused"] + 2 * copied * es < moved["fused"] else "flash"

    def slice_channels(self, x: Any, start: int, count: int) -> Any:
        """Channels [start, start + count) of x (B, C, ...) as a new contiguous array (one device copy per image)."""
        B, C = x.shape[:2]
        inner = int(np.prod(x.shape[2:]))
        y = self.empty((B, count, *x.shape[2:]), x.dtype)
        es = x.dtype.itemsize
        for b in range(B):
            self.cl.enqueue_copy(self.queue, y.base_data, x.base_data, byte_count=count * inner * es,
                                 src_offset=x.offset + (b * C + start) * inner * es, dst_offset=y.offset + b * count * inner * es)
        return y

    def gemm_batched(self, a: Any, b: Any, M: int, N: int, K: int, batch: int, a_mod: int, a_trans: bool = False,
                     b_trans: bool = False, alpha: float = 1.0) -> Any:
        c = self.empty((batch, M, N))
        kg = self.kernel("conv", "gemm_batched")
        self._run(kg, *self._gemm_grid(M, N, batch, kg), a, b, c, np.int32(M), np.int32(N),
                  np.int32(K), np.int32(a_mod), np.int32(1 if a_trans else 0), np.int32(1 if b_trans else 0), np.float32(alpha))
        return c

    def attention_unfused(self, q: Any, k: Any, v: Any, heads: int, head_dim: int, n: int, m: int,
                          scale: float | None = None, p_hook: Any = None) -> Any:
        """The textbook path (benchmark baseline; int8 bundles' quantized attention): S = Q^T K
        (materialised, N x M per head), softmax kernel, p_hook(P) if given, O = V P^T.
        q, k, v: (B, heads*D, N|M) channels-first, as flash_attention."""
        B = q.shape[0]
        bh = B * heads
        s = scale if scale is not None else head_dim**-0.5
        scores = self.gemm_batched(q.reshape(bh, head_dim, n), k.reshape(bh, head_dim, m), n, m, head_dim, bh, bh,
                                   a_trans=True, alpha=s)  # (BH, N, M), materialised
        p = self.softmax(scores)
        if p_hook is not None:
            p = p_hook(p)
        o = self.gemm_batched(v.reshape(bh, head_dim, m), p, head_dim, n, m, bh, bh, b_trans=True)  # (BH, D, N)
        return o.reshape(B, heads * head_dim, n)

    # ------------------------------------------------------------------ convolution
    def conv2d(self, x: Any, w: Any, bias: Any | None, stride: int = 1, pad: int | tuple[int, int, int, int] = 0,
               chan_add: Any | None = None, res: Any | None = None, out_scale: float = 1.0,
               kernel_size: tuple[int, int] | None = None, out_channels: int | None = None) -> Any:
        """Implicit-GEMM convolution. w: (Co, Ci, KH, KW) (or flattened with kernel_size given).
        pad: int or (top, left, bottom, right). Epilogue: + bias + chan_add[b, co] + res, * out_scale."""
        B, Ci, H, W = x.shape
        if kernel_size is None:
            Co, _, KH, KW = w.shape
        else:
            KH, KW = kernel_size
            Co = out_channels if out_channels is not None else w.shape[0]
        pt, pl, pb, pr = (pad, pad, pad, pad) if isinstance(pad, int) else pad
        Ho = (H + pt + pb - KH) // stride + 1
        Wo = (W + pl + pr - KW) // stride + 1
        y = self.empty((B, Co, Ho, Wo))
        flags = (1 if bias is not None else 0) | (2 if chan_add is not None else 0) | (4 if res is not None else 0)
        d = self._dummy
        kc = self.kernel("conv", "conv2d")
        self._run(kc, *self._gemm_grid(Co, Ho * Wo, B, kc), x, w,
                  bias if bias is not None else d, chan_add if chan_add is not None else d, res if res is not None else d,
                  y, np.int32(Ci), np.int32(H), np.int32(W), np.int32(Co), np.int32(Ho), np.int32(Wo), np.int32(KH),
                  np.int32(KW), np.int32(stride), np.int32(pt), np.int32(pl), np.int32(flags), np.float32(out_scale))
        return y

    def conv2d_winograd(self, x: Any, u: Any, bias: Any | None, chan_add: Any | None = None, res: Any | None = None,
                        out_scale: float = 1.0) -> Any:
        """3x3, stride 1, pad 1 convolution by Winograd F(2x2, 3x3); u = winograd_weights(w) on the device."""
        B, Ci, H, W = x.shape
        Co = u.shape[1]
        th, tw = (H + 1) // 2, (W + 1) // 2
        nt = th * tw
        V = self.empty((B, 16, Ci, nt))
        lt = min(self.wg1d, _pow2_floor(nt))
        self._run(self.kernel("winograd", "winograd_input"), (nt, Ci, B), (lt, 1, 1), x, V, np.int32(Ci), np.int32(H),
                  np.int32(W), np.int32(1), np.int32(th), np.int32(tw))
        Mt = self.gemm_batched(u, V, Co, nt, Ci, B * 16, 16)
        y = self.empty((B, Co, H, W))
        flags = (1 if bias is not None else 0) | (2 if chan_add is not None else 0) | (4 if res is not None else 0)
        d = self._dummy
        self._run(self.kernel("winograd", "winograd_output"), (nt, Co, B), (lt, 1, 1), Mt,
                  bias if bias is not None else d, chan_add if chan_add is not None else d, res if res is not None else d,
                  y, np.int32(Co), np.int32(H), np.int32(W), np.int32(th), np.int32(tw), np.int32(flags),
                  np.float32(out_scale))
        return y

    # ------------------------------------------------------------------ int8
    def quantize(self, x: Any, scale: float, zp: int, signed: bool = True, bits: int = 8) -> Any:
        qt = "char" if signed else "uchar"
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        q = self.empty(x.shape, np.int8 if signed else np.uint8)
        self._run(self.kernel("int8", "quantize", QT=qt), *self._ew(x.size), x, q, np.int32(x.size), np.float32(scale),
                  np.int32(zp), np.int32(qmin), np.int32(qmax))
        return q

    def dequantize(self, q: Any, scale: float, zp: int) -> Any:
        qt = "char" if q.dtype == np.int8 else "uchar"
        x = self.empty(q.shape, np.float32)
        self._run(self.kernel("int8", "dequantize", QT=qt), *self._ew(q.size), q, x, np.int32(q.size), np.float32(scale),
                  np.int32(zp))
        return x

    def conv2d_int8(self, xq: Any, wq: Any, bias_i32: Any, mult: Any, zp_x: int, zp_y: int, stride: int = 1,
                    pad: int = 0, bits: int = 8) -> Any:
        """Integer convolution: xq int8/uint8 (B, Ci, H, W), wq int8 (Co, Ci, KH, KW), bias int32 (Co,),
        mult float32 (Co,) = s_x * s_w / s_y; returns the requantized output in xq's dtype."""
        B, Ci, H, W = xq.shape
        Co, _, KH, KW = wq.shape
        signed = xq.dtype == np.int8
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        Ho = (H + 2 * pad - KH) // stride + 1
        Wo = (W + 2 * pad - KW) // stride + 1
        y = self.empty((B, Co, Ho, Wo), xq.dtype)
        ts = self.ts
        self._run(self.kernel("int8", "conv2d_int8", QT="char" if signed else "uchar"), (Ho * Wo, Co, B), (ts, ts, 1),
                  xq, wq, bias_i32, mult, y, np.int32(Ci), np.int32(H), np.int32(W), np.int32(Co), np.int32(Ho),
                  np.int32(Wo), np.int32(KH), np.int32(KW), np.int32(stride), np.int32(pad), np.int32(pad),
                  np.int32(zp_x), np.int32(zp_y), np.int32(qmin), np.int32(qmax))
        return y


    # ------------------------------------------------------------------ int8 bundles (float around integer convs)
    @property
    def use_int8_dot(self) -> bool:
        """The packed 4-wide dot-product int8 conv: where the device has a dot-product extension, and on
        devices without dedicated local memory (the tiled kernel's int tiles would live in main memory)."""
        return self.variants.int8_dot != "emulated" or not self.variants.local_tiles

    @staticmethod
    def qrange(bits: int, signed: bool) -> tuple[int, int]:
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)

    def quantize_split(self, x: Any, split: int, s1: float, zp1: int, s2: float, zp2: int, bits: int = 8,
                       signed: bool = True) -> Any:
        """Quantize channels [0, split) with (s1, zp1) and [split, C) with (s2, zp2); float32 x (B, C, ...)."""
        C = x.shape[1]
        hw = int(np.prod(x.shape[2:]))
        qmin, qmax = self.qrange(bits, signed)
        q = self.empty(x.shape, np.int8 if signed else np.uint8)
        self._run(self.kernel("int8", "quantize_split", QT="char" if signed else "uchar"), *self._ew(x.size), x, q,
                  np.int32(x.size), np.int32(C), np.int32(hw), np.int32(split), np.float32(s1), np.int32(zp1),
                  np.float32(s2), np.int32(zp2), np.int32(qmin), np.int32(qmax))
        return q

    def fake_quant_seg(self, x: Any, segs: list[tuple[int, float, int, int, int]]) -> Any:
        """Quantize-dequantize float32 x (B, C, ...) by channel segments [(start, scale, zp, qmin, qmax)] (1 to 3,
        ascending starts, the first at 0)."""
        C = x.shape[1]
        hw = int(np.prod(x.shape[2:]))
        segs = list(segs) + [(C, 1.0, 0, 0, 0)] * (3 - len(segs))
        y = self.empty(x.shape, np.float32)
        args: list[Any] = []
        for _, s, z, lo, hi in segs:
            args += [np.float32(s), np.int32(z), np.int32(lo), np.int32(hi)]
        self._run(self.kernel("int8", "fake_quant_seg"), *self._ew(x.size), x, y, np.int32(x.size), np.int32(C),
                  np.int32(hw), np.int32(segs[1][0]), np.int32(segs[2][0]), *args)
        return y

    def conv2d_int8_dq(self, xq: Any, wq: Any, w_scale: Any, bias: Any | None, split: int, zp1: int, zp2: int, s1: float,
                       s2: float, stride: int = 1, pad: tuple[int, int, int, int] = (0, 0, 0, 0),
                       chan_add: Any | None = None, res: Any | None = None, out_scale: float = 1.0,
                       wsum: Any | None = None) -> Any:
        """Integer conv of quantized input xq (two channel parts) and int8 weights wq (Co, Ci, KH, KW), float output.
        wsum: int32 (Co, 2) weight row sums per part (weight_sums), for the packed-dot variant."""
        B, Ci, H, W = xq.shape
        Co, _, KH, KW = wq.shape
        pt, pl, pb, pr = pad
        Ho = (H + pt + pb - KH) // stride + 1
        Wo = (W + pl + pr - KW) // stride + 1
        y = self.empty((B, Co, Ho, Wo), np.float32)
        flags = (1 if bias is not None else 0) | (2 if chan_add is not None else 0) | (4 if res is not None else 0)
        d = self._dummy
        qt = "char" if xq.dtype == np.int8 else "uchar"
        if self.use_int8_dot:
            if wsum is None:  # computed once per weight buffer
                key = (int(wq.base_data.int_ptr) + int(wq.offset), split)
                wsum = self._wsum.get(key)
                if wsum is None:
                    wsum = self._wsum[key] = self.to_device(weight_sums(wq.get(), split), np.int32)
            k = self.kernel("int8", "conv2d_int8_dq_dot", QT=qt)
            self._run(k, (Ho * Wo, Co, B), (self.local_1d(k, Ho * Wo, 64), 1, 1), xq, wq, wsum, w_scale,
                      bias if bias is not None else d, chan_add if chan_add is not None else d,
                      res if res is not None else d, y, np.int32(Ci), np.int32(H), np.int32(W), np.int32(Co),
                      np.int32(Ho), np.int32(Wo), np.int32(KH), np.int32(KW), np.int32(stride), np.int32(pt),
                      np.int32(pl), np.int32(split), np.int32(zp1), np.int32(zp2), np.float32(s1), np.float32(s2),
                      np.int32(flags), np.float32(out_scale))
            return y
        ts = self.ts
        self._run(self.kernel("int8", "conv2d_int8_dq", QT=qt),
                  (Ho * Wo, Co, B), (ts, ts, 1), xq, wq, w_scale, bias if bias is not None else d,
                  chan_add if chan_add is not None else d, res if res is not None else d, y, np.int32(Ci), np.int32(H),
                  np.int32(W), np.int32(Co), np.int32(Ho), np.int32(Wo), np.int32(KH), np.int32(KW), np.int32(stride),
                  np.int32(pt), np.int32(pl), np.int32(split), np.int32(zp1), np.int32(zp2), np.float32(s1),
                  np.float32(s2), np.int32(flags), np.float32(out_scale))
        return y

    # ------------------------------------------------------------------ lowered int8 (int8 between integer layers)
    @staticmethod
    def _qt(dtype: Any) -> str:
        return "uchar" if np.dtype(dtype) == np.uint8 else "char"

    def _store_args(self, store: dict[str, Any] | None) -> tuple[Any, list[Any]]:
        """(output dtype, [ss, sz, smin, smax]) of a store onto a consumer's grid (None: float)."""
        if store is None:
            return np.float32, [np.float32(1.0), np.int32(0), np.int32(0), np.int32(0)]
        dt = np.uint8 if store["dtype"] == "uint8" else np.int8
        return dt, [np.float32(store["scale"]), np.int32(store["zero_point"]), np.int32(store["qmin"]), np.int32(store["qmax"])]

    def quantize_grid(self, x: Any, segs: list[dict[str, Any]], split: int = -1) -> Any:
        """float32 x (B, C, ...) onto segs[0]'s grid (channels [0, split)) and segs[-1]'s (the rest; split -1:
        all channels on segs[0]); storage int8 or uint8 as segs[0]'s dtype says (both segments alike)."""
        C = x.shape[1]
        hw = int(np.prod(x.shape[2:]))
        g1, g2 = segs[0], segs[-1]
        dt = np.uint8 if g1["dtype"] == "uint8" else np.int8
        q = self.empty(x.shape, dt)
        self._run(self.kernel("int8", "quantize_split", QT=self._qt(dt)), *self._ew(x.size), x, q, np.int32(x.size),
                  np.int32(C), np.int32(hw), np.int32(C if split < 0 else split), np.float32(g1["scale"]),
                  np.int32(g1["zero_point"]), np.float32(g2["scale"]), np.int32(g2["zero_point"]),
                  np.int32(g1["qmin"]), np.int32(g1["qmax"]))
        return q

    def conv2d_int8_lowered(self, xq: Any, wq: Any, parts: list[dict[str, Any]], bias: Any | None, stride: int = 1,
                            pad: tuple[int, int, int, int] = (0, 0, 0, 0), chan_add: Any | None = None,
                            res: Any | None = None, out_scale: float = 1.0, store: dict[str, Any] | None = None,
                            direct: bool = False) -> Any:
        """A lowered integer conv/linear (edgediff.lowering): xq int8/uint8 (B, Ci, H, W) holding each part's
        input channels on that part's grid, wq int8 (Co, Ci, KH, KW), bias int32 (Co,) or None.
        parts: 1-2 dicts {split (first channel of the next part), zp (input zero point), acc_scale
        (device float32 (Co,)), mult (device float32 (Co,) or None: float output), out (ActQ dict or None)}.
        store: the consumer's input grid (ActQ dict + dtype) to write int8/uint8, or None for float32;
        direct: write part 1's requantized integer itself (one part, nothing added, same grid)."""
        B, Ci, H, W = xq.shape
        Co, _, KH, KW = wq.shape
        pt, pl, pb, pr = pad
        Ho = (H + pt + pb - KH) // stride + 1
        Wo = (W + pl + pr - KW) // stride + 1
        odt, sargs = self._store_args(store)
        y = self.empty((B, Co, Ho, Wo), odt)
        two = len(parts) > 1
        p1, p2 = parts[0], parts[-1]
        split = int(p1["split"]) if two else Ci
        if direct and (two or chan_add is not None or res is not None or out_scale != 1.0 or p1["out"] is None
                       or store is None):
            raise ValueError("conv2d_int8_lowered: direct needs one requantizing part, no epilogue terms and a store")
        flags = ((1 if bias is not None else 0) | (2 if chan_add is not None else 0) | (4 if res is not None else 0)
                 | (8 if p1["out"] is not None else 0) | (16 if two and p2["out"] is not None else 0)
                 | (32 if two else 0) | (64 if direct else 0))
        d = self._dummy

        def outq(p: dict[str, Any]) -> list[Any]:
            o = p["out"]
            if o is None:
                return [np.int32(0), np.int32(0), np.int32(0), np.float32(0.0)]
            return [np.int32(o["zero_point"]), np.int32(o["qmin"]), np.int32(o["qmax"]), np.float32(o["scale"])]

        args = [bias if bias is not None else self._dummy32(), p1["mult"] if p1["mult"] is not None else d,
                p1["acc_scale"], (p2["mult"] if p2["mult"] is not None else d) if two else d,
                p2["acc_scale"] if two else d, chan_add if chan_add is not None else d, res if res is not None else d, y,
                np.int32(Ci), np.int32(H), np.int32(W), np.int32(Co), np.int32(Ho), np.int32(Wo), np.int32(KH),
                np.int32(KW), np.int32(stride), np.int32(pt), np.int32(pl), np.int32(split), np.int32(p1["zp"]),
                np.int32(p2["zp"]), np.int32(flags), *outq(p1), *outq(p2), np.float32(out_scale), *sargs]
        defs = {"QT": self._qt(xq.dtype), "OUT_Q": int(store is not None), "OT": self._qt(odt)}
        if self.use_int8_dot:
            key = (int(wq.base_data.int_ptr) + int(wq.offset), split)
            wsum = self._wsum.get(key)
            if wsum is None:  # computed once per weight buffer
                wsum = self._wsum[key] = self.to_device(weight_sums(wq.get(), split), np.int32)
            k = self.kernel("int8", "conv2d_int8_lowered_dot", **defs)
            self._run(k, (Ho * Wo, Co, B), (self.local_1d(k, Ho * Wo, 64), 1, 1), xq, wq, wsum, *args)
        else:
            ts = self.ts
            self._run(self.kernel("int8", "conv2d_int8_lowered", **defs), (Ho * Wo, Co, B), (ts, ts, 1), xq, wq, *args)
        return y

    def attention_int8(self, q: Any, k: Any, v: Any, heads: int, head_dim: int, n: int, m: int, att: dict[str, Any],
                       q_off: int = 0, k_off: int = 0, v_off: int = 0, q_bstride: int | None = None,
                       kv_bstride: int | None = None, store: dict[str, Any] | None = None,
                       direct: bool = False) -> Any:
        """Integer attention (see int8.cl attention_int8): q/k/v int8 channels-first, att the lowered operands
        {q, k, p, v, output: ActQ dicts (output may be None), scale, qk_scale, av_multiplier}. Returns
        (B, heads * head_dim, n) float32, or int8/uint8 on `store`'s grid."""
        C = heads * head_dim
        B = q.size // (q_bstride or C * n)
        odt, sargs = self._store_args(store)
        y = self.empty((B, C, n), odt)
        o = att["output"]
        if direct and (o is None or store is None):
            raise ValueError("attention_int8: direct needs a requantized output and a store")
        pv_scale = float(np.float32(att["p"]["scale"]) * np.float32(att["v"]["scale"]))
        kern = self.kernel("int8", "attention_int8", HEAD_DIM=int(head_dim), OUT_Q=int(store is not None),
                           OT=self._qt(odt), QT="char")
        oargs = ([np.int32(1), np.float32(att["av_multiplier"]), np.int32(o["zero_point"]), np.int32(o["qmin"]),
                  np.int32(o["qmax"]), np.float32(o["scale"])] if o is not None else
                 [np.int32(0), np.float32(0.0), np.int32(0), np.int32(0), np.int32(0), np.float32(0.0)])
        self._run(kern, (n, heads, B), (self.local_1d(kern, n, 64), 1, 1), q, k, v, y, np.int32(heads), np.int32(n),
                  np.int32(m), np.int32(q_off), np.int32(k_off), np.int32(v_off), np.int32(q_bstride or C * n),
                  np.int32(kv_bstride or C * m), np.int32(att["q"]["zero_point"]), np.int32(att["k"]["zero_point"]),
                  np.int32(att["v"]["zero_point"]), np.float32(att["qk_scale"]), np.float32(att["scale"]),
                  np.float32(att["p"]["scale"]), np.int32(att["p"]["zero_point"]), np.int32(att["p"]["qmax"]),
                  np.float32(pv_scale), *oargs, np.int32(1 if direct else 0), *sargs)
        return y

    def _seg_store_args(self, C: int, store: dict[str, Any], store2: dict[str, Any] | None,
                        split: int) -> tuple[Any, list[Any]]:
        """(dtype, [split, s1, z1, s2, z2, lo, hi]) of a store onto one grid, or two (channels [0, split) on
        `store`, the rest on `store2`: a shortcut-split layer's halves, in the same storage type)."""
        odt, _ = self._store_args(store)
        g2 = store2 if store2 is not None and split >= 0 else store
        return odt, [np.int32(C if split < 0 or store2 is None else split), np.float32(store["scale"]),
                     np.int32(store["zero_point"]), np.float32(g2["scale"]), np.int32(g2["zero_point"]),
                     np.int32(store["qmin"]), np.int32(store["qmax"])]

    def concat_q(self, a: Any, b: Any, store: dict[str, Any], store2: dict[str, Any] | None = None,
                 split: int = -1) -> Any:
        """Channel concat of (B, Ca, ...) and (B, Cb, ...) stored quantized (see _seg_store_args)."""
        B, ca = a.shape[:2]
        cb = b.shape[1]
        hw = int(np.prod(a.shape[2:]))
        odt, qargs = self._seg_store_args(ca + cb, store, store2, split)
        y = self.empty((B, ca + cb, *a.shape[2:]), odt)
        self._run(self.kernel("elementwise", "concat_channels_q", OT=self._qt(odt)), *self._ew(y.size), a, b, y,
                  np.int32(ca), np.int32(cb), np.int32(hw), np.int32(y.size), *qargs)
        return y

    def group_norm_q(self, x: Any, gamma: Any, beta: Any, groups: int, eps: float, silu: bool,
                     store: dict[str, Any], store2: dict[str, Any] | None = None, split: int = -1,
                     S: int | None = None) -> Any:
        """GroupNorm (+SiLU) written quantized onto `store`'s grid (an ActQ dict + dtype; with `store2`,
        channels from `split` on on its grid): what the integer layer reading it would quantize, without a
        float tensor in between. S: work-groups per group (default: the device rule, group_norm_splits)."""
        B, C = x.shape[:2]
        if C % groups:
            raise ValueError(f"group_norm: {C} channels not divisible by {groups} groups")
        hw = int(np.prod(x.shape[2:]))
        odt, sargs = self._seg_store_args(C, store, store2, split)
        y = self.empty(x.shape, odt)
        n = (C // groups) * hw
        S = self.group_norm_splits(B * groups, n) if S is None else int(S)
        ot = self._qt(odt)
        if S > 1:
            part = self.empty((B * groups * S * 3,), np.float32)
            k1, k2 = self.kernel("norm", "group_partial_stats"), self.kernel("norm", "group_norm_split_apply_q", OT=ot)
            L = self.local_1d(k1, -(-n // S))
            lm = [self.cl.LocalMemory(4 * L) for _ in range(3)]
            self._run(k1, (B * groups * S * L,), (L,), x, part, np.int32(C), np.int32(hw), np.int32(groups),
                      np.int32(S), *lm)
            L2 = self.local_1d(k2, -(-n // S))
            self._run(k2, (B * groups * S * L2,), (L2,), x, part, gamma, beta, y, np.int32(C), np.int32(hw),
                      np.int32(groups), np.int32(S), np.float32(eps), np.int32(1 if silu else 0), *sargs)
            return y
        k = self.kernel("norm", "group_norm_q", OT=ot)
        L = self.local_1d(k, n)
        self._run(k, (B * groups * L,), (L,), x, gamma, beta, y, np.int32(C), np.int32(hw), np.int32(groups),
                  np.float32(eps), np.int32(1 if silu else 0), *[self.cl.LocalMemory(4 * L) for _ in range(3)], *sargs)
        return y


# ONNX / TFLite op types whose work the OpenCL kernels carry when they occur in a UNet2DModel
# (used by edgediff.profiling.coverage). Layout ops (Reshape, Transpose, ...) are free in the
# runtime's channels-first layout; Sigmoid+Mul is SiLU, Erf is GELU, Sin/Cos/Exp the timestep
# embedding, MatMul+Softmax attention, InstanceNormalization the way exporters spell GroupNorm.
# int8 bundles run quantized convs/linears as integer kernels (QuantizeLinear + QLinearConv/
# ConvInteger + DequantizeLinear patterns); quantized attention matmuls are simulated in float.
SUPPORTED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    "Conv", "Gemm", "MatMul", "Add", "Mul", "Div", "Sigmoid", "Erf", "Softmax", "GroupNormalization",
    "InstanceNormalization", "Concat", "Resize", "Upsample", "Sin", "Cos", "Exp", "Reshape", "Transpose",
    "Unsqueeze", "Squeeze", "Flatten", "Identity", "Constant", "Shape", "Gather", "Slice", "Split", "Cast",
    "CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "MUL", "LOGISTIC", "SOFTMAX", "CONCATENATION",
    "RESIZE_NEAREST_NEIGHBOR", "SIN", "COS", "EXP", "RESHAPE", "TRANSPOSE", "GELU",
})
