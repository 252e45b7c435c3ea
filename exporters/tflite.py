"""TFLite / LiteRT backend: fp32, fp16 and int8 `.tflite` files through litert-torch (no TensorFlow).

How the file is made
- The float denoiser (quantization wrappers stripped, fp16 hooks removed: see
  exporters.onnx.float_denoiser) is wrapped so that its signature is
  `serving_default(sample, timestep[, encoder_hidden_states | class_labels][, extras]) -> {"out": ...}`
  (every input of `model.signature.input_names()`, extras such as SDXL text_embeds/time_ids or
  SD3 pooled_projections included, each with a batch axis) and converted with
  `litert_torch.convert` (torch.export -> StableHLO -> TFLite converter).
- GroupNorm: torch's decomposition of `native_group_norm` lowers to MEAN/SUB/RSQRT plus
  BROADCAST_TO, and BROADCAST_TO is not in the TFLite GPU delegate's operator list, so each
  nn.GroupNorm is exported as `GpuGroupNorm` (reshape to (B, G, -1), MEAN, SUB, MUL, RSQRT,
  implicit broadcasting only): the same arithmetic, every op delegate-supported.
- Attention: diffusers' SDPA processor lowers to BATCH_MATMUL + SOFTMAX + MUL, all of which
  the GPU delegate runs.
- Batch: litert-torch 0.10 cannot lower a dynamic batch axis through diffusers' timestep
  broadcast (`torch.ones(sample.shape[0])` fails in its JAX bridge), so the batch is fixed at
  export (`batch=1` by default: one image per call is what phones run). `load_denoiser`
  splits and pads any batch to that size.
- fp16: the fp32 file's CONV_2D / FULLY_CONNECTED / DEPTHWISE weights are cast to float16
  by ai-edge-quantizer's `float_casting` recipe (explicit DEQUANTIZE ops: the standard TFLite
  "fp16 weights" model; the GPU delegate skips those DEQUANTIZE nodes and runs in fp16,
  XNNPACK runs fp32 arithmetic on the dequantized weights).
- int8: every layer named in the artifact's QuantParams gets the scales and zero points of
  the artifact, written as PT2E `quantized_decomposed` quantize/dequantize pairs that the
  TFLite converter (STATIC Q/DQ mode) turns into int8 tensors: the layer's input activation
  (per tensor; two halves for shortcut-split layers, which are written as two layers on the
  halves plus ADD, see `split_layers` in the report), its weight (int8, per output channel,
  symmetric; the on-grid float weights give the integers exactly), and the operands of the
  attention matmuls. See `int8_report` in the export report and docs/tflite_coreml.md for
  what LiteRT does with them.

Exported I/O: inputs sample float32 [B,C,H,W], timestep float32 [B], optional
encoder_hidden_states float32 [B,S,D] / class_labels (int64 in PyTorch; int32 in the
.tflite since TFLite runtimes have no int64 inputs), then the signature's extras by name
(LiteRTDenoiser feeds them from a dict `cond`); output `out` float32 [B,C_out,H,W].
Flux does not convert: the float64 POW of diffusers' RoPE is not legalized (exit 2 names tfl.pow).

Modules: exporters.tflite (this: the Backend), tflite_convert (litert-torch conversion,
build_tflite), tflite_int8 (Q/DQ twins, full-integer integerize), tflite_runtime (LiteRT
interpreter, tflite_info, LiteRTDenoiser). The names below are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgediff.exporters.base import PRECISIONS, Backend, ExportReport, input_names, threads
from edgediff.exporters.tflite_convert import GpuGroupNorm, build_tflite, gpu_friendly
from edgediff.exporters.tflite_int8 import full_integer_ok, insert_tflite_int, insert_tflite_qdq, integerize
from edgediff.exporters.tflite_runtime import (
    INSTALL,
    OUTPUT_NAME,
    SIGNATURE,
    LiteRTDenoiser,
    gpu_delegate_report,
    integer_macs,
    interpreter_cls,
    op_histogram,
    open_interpreter,
    tflite_info,
)

from edgediff.artifact import atomic_file
from edgediff.model import DiffusionModel

_interpreter = open_interpreter  # the name tests and older callers use

__all__ = ["BACKEND", "INSTALL", "OUTPUT_NAME", "SIGNATURE", "GpuGroupNorm", "LiteRTDenoiser", "TFLiteBackend",
           "build_tflite", "full_integer_ok", "gpu_delegate_report", "gpu_friendly", "input_names",
           "insert_tflite_int", "insert_tflite_qdq", "integer_macs", "integerize", "op_histogram", "open_interpreter",
           "tflite_info"]


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------


class TFLiteBackend(Backend):
    target = "tflite"
    precisions = PRECISIONS
    suffixes = (".tflite",)
    options = frozenset({"batch"})

    def available(self) -> tuple[bool, str]:
        for mod in ("litert_torch", "ai_edge_litert.interpreter", "ai_edge_quantizer"):
            try:
                __import__(mod)
            except ImportError as e:
                return False, f"{mod.split('.')[0]} is not installed ({e}); install it with {INSTALL}"
        return True, "litert-torch and ai-edge-litert are installed"

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        from edgediff.exporters.base import probe

        return probe(interpreter_cls, "LiteRT interpreter (XNNPACK, CPU) runs .tflite files here")

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        data, facts = build_tflite(model, precision, batch=options.get("batch", 1))
        with atomic_file(out, force=force) as tmp:
            tmp.write_bytes(data)
        info = tflite_info(out)
        return ExportReport(self.target, precision, str(out), info["size_bytes"], extra={
            "converter": "litert-torch", **facts, "inputs": info["inputs"], "outputs": info["outputs"],
            "ops": info["ops"], "weight_dtypes": info["weight_dtypes"], "gpu_delegate": info["gpu_delegate"]})

    def load_denoiser(self, path: Path) -> LiteRTDenoiser:
        return LiteRTDenoiser(path, threads=threads())

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        """Structural check: loads, inputs/outputs and shapes as the reference expects, op histogram."""
        info = tflite_info(path)
        problems = []
        if reference is not None:
            want = input_names(reference.signature)
            if sorted(info["inputs"]) != sorted(want):
                problems.append(f"inputs {sorted(info['inputs'])} != expected {sorted(want)}")
            shp = info["inputs"].get("sample", {}).get("shape", [])
            if list(shp[1:]) != list(reference.signature.sample_shape):
                problems.append(f"sample shape {shp} does not match {list(reference.signature.sample_shape)}")
        if OUTPUT_NAME not in info["outputs"]:
            problems.append(f"no output named {OUTPUT_NAME!r}")
        return {"loads": True, "ok": not problems, "problems": problems, "inputs": info["inputs"],
                "outputs": info["outputs"], "ops": info["ops"], "weight_dtypes": info["weight_dtypes"]}

    def info(self, path: Path) -> dict[str, Any]:
        return tflite_info(path)


BACKEND = TFLiteBackend()
