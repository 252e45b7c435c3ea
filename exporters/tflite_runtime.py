"""The .tflite file in LiteRT: the optional packages, the interpreter, op histogram, GPU-delegate
coverage, integer MACs, tflite_info and LiteRTDenoiser (the file as a Denoiser)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgediff.exporters.base import FixedBatchDenoiser
from edgediff.exporters.ops import LITERT_GPU_OPS, LITERT_GPU_SOURCE

from edgediff.errors import BadInput, Unavailable
from edgediff.runtime.litert import SIGNATURE, LiteRTEntry

INSTALL = 'pip install -e ".[tflite]"'
OUTPUT_NAME = "out"


# ------------------------------------------------------------------------------------------
# optional packages
# ------------------------------------------------------------------------------------------


def require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Unavailable(f"the tflite target needs {module.split('.')[0]} ({e}); install it with {INSTALL}") from None


def interpreter_cls() -> Any:
    return require("ai_edge_litert.interpreter").Interpreter


# ------------------------------------------------------------------------------------------
# the .tflite file: op histogram, GPU-delegate coverage, runtime
# ------------------------------------------------------------------------------------------


def open_interpreter(path: Path, threads: int | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        it = interpreter_cls()(model_path=str(path), num_threads=threads)
    except ValueError as e:
        raise BadInput(f"{path}: not a TFLite model LiteRT can load ({str(e).splitlines()[0]})") from None
    return it


def op_histogram(it: Any) -> dict[str, int]:
    return dict(Counter(o["op_name"] for o in it._get_ops_details()).most_common())


def gpu_delegate_report(ops: dict[str, int], quantized: bool) -> dict[str, Any]:
    """Which ops of the graph the TFLite GPU delegate would leave to the CPU (by op type)."""
    supported = set(LITERT_GPU_OPS)
    if not quantized:
        supported.discard("QUANTIZE")  # only with allow_quant_ops
    fallback = {op: n for op, n in ops.items() if op not in supported}
    return {"all_ops_supported": not fallback, "cpu_fallback_ops": fallback, "source": LITERT_GPU_SOURCE}


def _weight_dtypes(it: Any) -> dict[str, int]:
    """Element types of the constant tensors that feed CONV_2D/FC/DEPTHWISE/DEQUANTIZE."""
    details = {d["index"]: d for d in it.get_tensor_details()}
    counts: Counter[str] = Counter()
    seen: set[int] = set()
    for o in it._get_ops_details():
        if o["op_name"] not in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D", "DEQUANTIZE"):
            continue
        idx = o["inputs"][0] if o["op_name"] == "DEQUANTIZE" else (o["inputs"][1] if len(o["inputs"]) > 1 else -1)
        if idx < 0 or idx in seen:
            continue
        seen.add(idx)
        d = details[idx]
        try:
            it.get_tensor(idx)  # constants are readable; activations are not before invoke
        except ValueError:
            continue
        counts[np.dtype(d["dtype"]).name] += 1
    return dict(counts)


def _precision(weights: dict[str, int]) -> str:
    if weights.get("int8"):
        return "int8"
    if weights.get("float16"):
        return "fp16"
    return "fp32"


_MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL")


def integer_macs(path: Path, interpreter: Any = None) -> dict[str, Any]:
    """MACs of the conv/linear/matmul ops of a .tflite, integer vs float.

    An op counts as integer when its activation input and its weight (second input) are int8
    tensors: int8 kernels (XNNPACK QS8/QC8 on CPU). A float op fed by DEQUANTIZE, or a hybrid op
    (float activations, int8 weights), counts as float. Returns macs, integer_macs,
    integer_macs_share and the float MAC ops (name, op, macs).
    """
    from edgediff.profiling.graph import tflite_ops

    it = interpreter or open_interpreter(path)
    types = {d["index"]: np.dtype(d["dtype"]) for d in it.get_tensor_details()}
    by_index = {f"{o['op_name']}_{o['index']}": o for o in it._get_ops_details()}
    total = integer = 0
    floats: list[dict[str, Any]] = []
    for w in tflite_ops(Path(path), interpreter=it):
        if w.op not in _MAC_OPS or not w.macs:
            continue
        total += w.macs
        ins = [int(i) for i in by_index[w.node]["inputs"]]
        if len(ins) >= 2 and all(types.get(i) == np.dtype(np.int8) for i in ins[:2]):
            integer += w.macs
        else:
            floats.append({"name": w.name, "op": w.op, "macs": int(w.macs)})
    return {"macs": int(total), "integer_macs": int(integer),
            "integer_macs_share": round(integer / total, 4) if total else 0.0, "float_mac_ops": floats}


def tflite_info(path: Path) -> dict[str, Any]:
    it = open_interpreter(path)
    sig = it.get_signature_list().get(SIGNATURE, {})
    runner = it.get_signature_runner(SIGNATURE) if sig else None
    ops = op_histogram(it)
    weights = _weight_dtypes(it)

    def io(d: dict[str, Any]) -> dict[str, Any]:
        return {"shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name}

    inputs = {k: io(v) for k, v in runner.get_input_details().items()} if runner else {}
    outputs = {k: io(v) for k, v in runner.get_output_details().items()} if runner else {}
    precision = _precision(weights)
    return {"kind": "exported", "target": "tflite", "path": str(path), "size_bytes": Path(path).stat().st_size,
            "precision": precision, "signature": SIGNATURE, "inputs": inputs, "outputs": outputs,
            "batch": inputs.get("sample", {}).get("shape", [None])[0], "ops": ops, "num_ops": sum(ops.values()),
            "weight_dtypes": weights, "gpu_delegate": gpu_delegate_report(ops, precision == "int8"),
            **integer_macs(path, it)}


class LiteRTDenoiser(FixedBatchDenoiser):
    """A .tflite denoiser in LiteRT's interpreter (XNNPACK on CPU), called like TorchDenoiser.

    The file has a fixed batch (see the module docstring): FixedBatchDenoiser chunks and pads.
    Calls go through the bundle's `LiteRTEntry` (tensors set by index, one invoke), not the
    signature runner, which resizes and re-allocates every input on each call.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInput(f"{path}: no such file")
        interpreter_cls()  # the tflite extra's install hint, not the bundle runtime's
        self.entry = LiteRTEntry(self.path, threads)
        self.interpreter = self.entry.interpreter
        self.inputs = self.entry.input_details
        if "sample" not in self.inputs or "timestep" not in self.inputs:
            raise BadInput(f"{path}: expected inputs 'sample' and 'timestep', found {sorted(self.inputs)}")
        if OUTPUT_NAME not in self.entry.outputs:
            raise BadInput(f"{path}: no output {OUTPUT_NAME!r} (it has {self.entry.outputs})")
        self.batch = self.entry.batch
        self.cond_name = next((n for n in ("encoder_hidden_states", "class_labels") if n in self.inputs), None)

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        (out,) = self.entry.run([OUTPUT_NAME], {name: v.detach().cpu().numpy() for name, v in feeds.items()})
        return torch.from_numpy(out)
