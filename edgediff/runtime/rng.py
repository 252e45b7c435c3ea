"""torch's CPU random normal stream, reproduced with numpy (no torch import).

`torch.randn(shape, generator=torch.Generator().manual_seed(seed))` on CPU draws from a
Mersenne Twister (MT19937, seeded like `init_genrand` with the low 32 bits of the seed) and
turns the 32-bit words into normals in one of two ways:

- fewer than 16 elements: one double-precision Box-Muller pair per two 53-bit uniforms
  (each uniform uses two 32-bit words, the first one as the high half), the second value of
  the pair cached in the generator and returned by the next such draw;
- 16 elements or more (contiguous float32): every element first gets a 24-bit float
  uniform, then each block of 16 becomes 8 Box-Muller pairs (u1 = 1 - data[j],
  u2 = data[j + 8]); when the size is not a multiple of 16 the last 16 values are redrawn
  with 16 fresh uniforms and transformed again.

On CPUs with AVX2 torch evaluates log/sin/cos of the 16-blocks with a float32 vector
library, so the port (which computes them in float64 and rounds) matches to a few float32
ulps (about 1e-6 absolute), not bit for bit; everything else (which words, which order) is
exact, so any later draw from the same generator stays aligned.
"""

from __future__ import annotations

import numpy as np

_MT_N = 624


def _init_genrand(seed: int) -> np.ndarray:
    key = np.empty(_MT_N, dtype=np.uint32)
    s = seed & 0xFFFFFFFF
    key[0] = s
    for i in range(1, _MT_N):
        s = (1812433253 * (s ^ (s >> 30)) + i) & 0xFFFFFFFF
        key[i] = s
    return key


class TorchGenerator:
    """A numpy stand-in for `torch.Generator().manual_seed(seed)` on CPU: `randn` gives the
    same float32 values (to ~1e-6) in the same order as torch's `randn(..., generator=g)`."""

    def __init__(self, seed: int = 0) -> None:
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchGenerator:
        self._bitgen = np.random.MT19937()
        # numpy's MT19937 state setter takes the raw key; pos 624 forces a twist first,
        # exactly like a freshly seeded std::mt19937.
        self._bitgen.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(int(seed)), "pos": _MT_N}}
        self._cached_normal: float | None = None
        return self

    def _words(self, n: int) -> np.ndarray:
        return self._bitgen.random_raw(n).astype(np.uint64)

    def _uniform_f32(self, n: int) -> np.ndarray:
        w = self._words(n)
        return ((w & np.uint64((1 << 24) - 1)).astype(np.float64) * 2.0**-24).astype(np.float32)

    def _uniform_f64(self) -> float:
        w = self._words(2)
        r = (int(w[0]) << 32) | int(w[1])
        return float(r & ((1 << 53) - 1)) * 2.0**-53

    def _normal_serial(self) -> float:
        if self._cached_normal is not None:
            v, self._cached_normal = self._cached_normal, None
            return v
        u1 = self._uniform_f64()
        u2 = self._uniform_f64()
        r = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._cached_normal = float(r * np.sin(theta))
        return float(r * np.cos(theta))

    @staticmethod
    def _box_muller16(data: np.ndarray) -> None:
        # data: float32 array of shape (k, 16), transformed in place
        u1 = 1.0 - data[:, :8].astype(np.float64)
        u2 = data[:, 8:].astype(np.float64)
        radius = np.sqrt(-2.0 * np.log(u1.astype(np.float32).astype(np.float64)))
        theta = (2.0 * np.pi * u2).astype(np.float32).astype(np.float64)
        data[:, :8] = (radius * np.cos(theta)).astype(np.float32)
        data[:, 8:] = (radius * np.sin(theta)).astype(np.float32)

    def randn(self, *shape: int | tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 array of `shape`, as torch.randn(shape, generator=g)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        dims = tuple(int(s) for s in shape)  # type: ignore[arg-type]
        size = int(np.prod(dims)) if dims else 1
        if size < 16:
            return np.array([self._normal_serial() for _ in range(size)], dtype=np.float64).astype(np.float32).reshape(dims)
        data = self._uniform_f32(size)
        full = size // 16 * 16
        blocks = data[:full].reshape(-1, 16)
        self._box_muller16(blocks)
        data[:full] = blocks.reshape(-1)
        if size % 16:
            tail = self._uniform_f32(16).reshape(1, 16)
            self._box_muller16(tail)
            data[size - 16 :] = tail.reshape(-1)
        return data.reshape(dims)
