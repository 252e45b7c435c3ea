"""`LiteRTEntry`: one .tflite component of a bundle in LiteRT's interpreter (numpy only, no torch).

The same interface as the ONNX runtime's `OrtEntry` (edgediff.runtime.generate): `run(outputs,
feeds)` by name with numpy arrays, `ms` and `calls` counters, so the bundle sampler loop, DeepCache
schedule included, drives either. A .tflite has a fixed batch (litert-torch exports it so):
feeds are split into chunks of that batch and the last chunk is padded by repeating its last
row, as the PyTorch-side LiteRTDenoiser does; outputs are cut back to the rows asked for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput, Unavailable

SIGNATURE = "serving_default"
INSTALL = "pip install ai-edge-litert"


def feed_value(detail: dict[str, Any], a: np.ndarray) -> np.ndarray:
    """`a` as the input `detail` (a LiteRT input detail) takes it: its dtype, and quantized with the
    input's scale/zero point where the file's input is integer and `a` is float (a converter folded
    the first QUANTIZE into the input)."""
    dt = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dt, np.integer) and scale and not np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.round(a / scale) + zero, info.min, info.max).astype(dt)
    return np.ascontiguousarray(a, dtype=dt)


def litert_version() -> str:
    try:
        from importlib.metadata import version

        return f"LiteRT {version('ai-edge-litert')}"
    except Exception:  # noqa: BLE001 - metadata missing in odd installs: the name is enough
        return "LiteRT"


class LiteRTEntry:
    """A bundle's .tflite component, fed by signature input name."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise Unavailable(f"running a TFLite bundle needs the LiteRT interpreter: {INSTALL}") from None
        self.path = Path(path)
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        except ValueError as e:
            raise BadInput(f"{self.path}: not a TFLite model LiteRT can load ({str(e).splitlines()[0][:300]})") from None
        if SIGNATURE not in self.interpreter.get_signature_list():
            raise BadInput(f"{self.path}: no {SIGNATURE!r} signature (not exported by edgediff?)")
        # tensors set by index and one invoke: the signature runner resizes and re-allocates every
        # input on each call, which cost 2 ms per call of the demo UNet here (a shallow call is 2.5 ms)
        self.interpreter.allocate_tensors()
        runner = self.interpreter.get_signature_runner(SIGNATURE)
        self.input_details = runner.get_input_details()
        self.output_index = {k: int(v["index"]) for k, v in runner.get_output_details().items()}
        self.outputs = sorted(self.output_index)
        if not self.input_details:
            raise BadInput(f"{self.path}: the signature has no inputs")
        # a pipeline's text encoder / VAE has no `sample`: every input has the batch axis first
        self.first = "sample" if "sample" in self.input_details else sorted(self.input_details)[0]
        self.batch = int(self.input_details[self.first]["shape"][0])
        self.ms = 0.0
        self.calls = 0

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            raise BadInput(f"{self.path}: the model has no output(s) {missing} (it has {self.outputs})")
        absent = [k for k in self.input_details if k not in feeds]
        if absent:
            raise BadInput(f"{self.path}: no value for input(s) {absent}")
        named = {k: np.asarray(feeds[k]) for k in self.input_details}
        n, b = named[self.first].shape[0], self.batch
        got: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        t0 = time.perf_counter()
        for i in range(0, n, b):
            chunk = {k: v[i:i + b] for k, v in named.items()}
            k = chunk[self.first].shape[0]
            if k < b:
                chunk = {name: np.concatenate([v, np.repeat(v[-1:], b - k, axis=0)]) for name, v in chunk.items()}
            for name, v in chunk.items():
                self.interpreter.set_tensor(int(self.input_details[name]["index"]), feed_value(self.input_details[name], v))
            self.interpreter.invoke()
            for o in outputs:
                got[o].append(np.asarray(self.interpreter.get_tensor(self.output_index[o]), dtype=np.float32)[:k])
        self.ms += (time.perf_counter() - t0) * 1e3
        self.calls += 1
        return [np.concatenate(got[o]) for o in outputs]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "batch": self.batch, "inputs": sorted(self.input_details),
                "outputs": self.outputs}
