"""The FPGA project as a denoiser: every call through the bit-accurate simulator of the whole-call program,
the first few also through the C-simulation of the design, compared bit for bit.

`verify` drives it like any runtime (edgediff.exporters.base.Backend.load_denoiser); `runtime_report()`
says how many calls ran, how many went through the C-simulation and whether they were identical.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.fpga.program import Program, call_inputs, dequantize_output, load_program, run_program

from edgediff.errors import BadInput


class FpgaCallDenoiser:
    """(x, t, cond) -> eps of the integer program; `csim_calls` calls (first image) also in C-simulation."""

    def __init__(self, project: Path, csim_calls: int = 2, array: Any = None) -> None:
        self.project = Path(project)
        self.program: Program = load_program(self.project / "call")
        self.csim_calls = int(csim_calls)
        self.array = array
        self.calls = 0
        self.images = 0
        self.sim_seconds = 0.0
        self.csim: list[dict[str, Any]] = []
        self._exe: Path | None = None
        self._work: tempfile.TemporaryDirectory[str] | None = None

    def __call__(self, x: Any, t: Any, cond: Any = None) -> Any:
        s_codes, e_codes = self.codes(x, t, cond)
        return self.finish(self.program, s_codes, e_codes, self.run(self.program, s_codes, e_codes)[self.program.output])

    def codes(self, x: Any, t: Any, cond: Any) -> tuple[np.ndarray, np.ndarray]:
        """The call's input codes (sample, time embedding row) for float x at timesteps t."""
        import torch

        if cond is not None:
            raise BadInput("the FPGA whole-call program takes no conditioning (an unconditional UNet2DModel)")
        xs = x.detach().float().cpu().numpy()
        tt = t.detach().float().cpu().numpy().reshape(-1) if isinstance(t, torch.Tensor) else np.asarray([t], float)
        return call_inputs(self.program, xs, tt)

    def run(self, prog: Program, s_codes: np.ndarray, e_codes: np.ndarray,
            feature_codes: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """`prog` on the simulator (timed)."""
        t0 = time.perf_counter()
        bufs = run_program(prog, s_codes, e_codes, feature_codes=feature_codes)
        self.sim_seconds += time.perf_counter() - t0
        return bufs

    def finish(self, prog: Program, s_codes: np.ndarray, e_codes: np.ndarray, acc: np.ndarray,
               feature_codes: np.ndarray | None = None) -> Any:
        """Count the call, C-simulate it while csim calls are left, dequantize the output."""
        import torch

        if len(self.csim) < self.csim_calls:
            self._csim(s_codes[:1], e_codes[:1], acc[:1], prog, None if feature_codes is None else feature_codes[:1])
        self.calls += 1
        self.images += s_codes.shape[0]
        return torch.from_numpy(dequantize_output(prog, acc))

    def _csim(self, s_codes: np.ndarray, e_codes: np.ndarray, acc: np.ndarray, prog: Program | None = None,
              feature_codes: np.ndarray | None = None) -> None:
        from edgediff.fpga import callsim, csim

        ok, why = csim.toolchain()
        if not ok:
            self.csim.append({"ran": False, "reason": why})
            self.csim_calls = len(self.csim)  # no compiler: the remaining calls cannot run either
            return
        if self._work is None:
            self._work = tempfile.TemporaryDirectory(prefix="edgediff-fpga-call-")
        work = Path(self._work.name)
        if self._exe is None:
            self._exe = callsim.compile_call(work / "call_tb", self.array or csim.ArrayConfig())
        prog = prog or self.program
        r = callsim.csim_call(prog, work / f"c{len(self.csim)}", s_codes, e_codes, exe=self._exe,
                              feature_codes=feature_codes)
        same = bool(np.array_equal(r.pop("output").reshape(-1), np.asarray(acc).reshape(-1)))
        self.csim.append({"ran": True, "identical": same and r["bit_exact"],
                          "call": "shallow" if feature_codes is not None else "full", **r})

    def runtime_report(self) -> dict[str, Any]:
        ran = [c for c in self.csim if c.get("ran")]
        return {"consistent": all(c["identical"] for c in ran) if ran else None,
                "runtime": "bit-accurate simulator of the whole-call integer program (fpga/program.py)",
                "calls": self.calls, "images": self.images, "simulator_seconds": round(self.sim_seconds, 2),
                "csim_calls": len(ran), "csim_identical": sum(1 for c in ran if c["identical"]),
                "csim": [{k: v for k, v in c.items() if k != "mismatching_ops" or v} for c in self.csim],
                "program": self.program.summary()}

    def close(self) -> None:
        if self._work is not None:
            self._work.cleanup()
            self._work = None
