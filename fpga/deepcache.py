"""DeepCache on the FPGA target: a shallow integer program beside the whole-call program, and the sampler driving both.

The cached feature of DeepCache at depth d (edgediff.deepcache: the hidden state entering up block
n-1-d, i.e. the output of up block n-2-d) is a buffer of the whole-call program (fpga/program.py):
the output of the last op of `up_blocks.{n-2-d}`. The shallow program is the whole-call program
with that buffer made an input and every op the output no longer needs removed (dead code from
the output back; the time embedding, conv_in, the outer down blocks' skip connections and the
outer up blocks stay). Same buffers, grids and constants: on the board the full call leaves the
feature's integer codes in memory and the shallow call reads them, so a shallow call is bit-exact
with the full program fed the same feature. The C-simulation runs it through the same testbench
(hls/call_tb.cpp takes any input buffers), one more input.

The project gets `call_shallow/` (program.json + program.npz, and cache.json: the schedule);
`CachedFpgaDenoiser` runs full or shallow per sampler step with `deepcache.CacheSteps`, the rule
the PyTorch sampler uses, one cached feature per batch chunk.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.fpga.program import Program, load_program, save_program
from edgediff.fpga.runtime import FpgaCallDenoiser

from edgediff.errors import BadInput

SHALLOW_DIR = "call_shallow"
CACHE_FILE = "cache.json"


def feature_buffer(prog: Program, depth: int, n_up: int) -> int:
    """The buffer holding the output of up block n-2-depth (the feature DeepCache caches)."""
    prefix = f"up_blocks.{n_up - 2 - depth}."
    hits = [o.out for o in prog.ops if o.name.startswith(prefix)]
    if not hits:
        raise BadInput(f"fpga target: DeepCache depth {depth}: no op of {prefix[:-1]} in the whole-call program")
    return hits[-1]


def shallow_program(prog: Program, feature: int) -> Program:
    """The ops the output needs when `feature` is given (dead-code elimination, order kept)."""
    needed = {prog.output}
    keep = []
    for o in reversed(prog.ops):
        if o.out in needed and o.out != feature:
            keep.append(o)
            needed.update(o.ins)
    ops = keep[::-1]
    live = {prog.sample, prog.temb, feature, *(o.out for o in ops)}
    return replace(prog, ops=ops, sizes={k: v for k, v in prog.sizes.items() if k in live},
                   grids={k: g for k, g in prog.grids.items() if k in live}, feature=feature)


def unet_blocks(model: Any) -> int:
    """The number of up blocks of the artifact's UNet (the feature's position depends on it)."""
    from edgediff.deepcache import find_unet

    return len(find_unet(model.denoiser).up_blocks)


def mark_feature(prog: Program, cache: dict[str, Any], n_up: int) -> Program:
    """The whole-call program with its DeepCache feature buffer marked (a full call's run keeps it)."""
    prog.feature = feature_buffer(prog, int(cache["depth"]), n_up)
    return prog


def write_shallow(project: Path, prog: Program, record: dict[str, Any], s_codes: np.ndarray, e_codes: np.ndarray,
                  array: Any = None) -> dict[str, Any]:
    """Save the shallow program under project/call_shallow and run one image's shallow call in the C-simulation
    (its feature from the full program on the same input) against the simulator; the report's record."""
    from edgediff.fpga import callsim, csim
    from edgediff.fpga.program import run_program

    assert prog.feature is not None
    shallow = shallow_program(prog, prog.feature)
    folder = Path(project) / SHALLOW_DIR
    save_program(shallow, folder)
    (folder / CACHE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    full_array = sum(1 for o in prog.ops if o.op == "array")
    rec: dict[str, Any] = {**shallow.summary(), "program": f"{SHALLOW_DIR}/program.json", "feature_buffer": prog.feature,
                           "feature_elements": int(prog.sizes[prog.feature]), "full_ops": len(prog.ops),
                           "full_array_layers": full_array}
    feat = run_program(prog, s_codes[:1], e_codes[:1])[prog.feature]
    ok, why = csim.toolchain()
    if not ok:
        return {**rec, "bit_exact": None, "reason": f"the C-simulation did not run: {why}"}
    work = folder / "csim"
    r = callsim.csim_call(shallow, work, s_codes[:1], e_codes[:1], feature_codes=feat,
                          exe=callsim.compile_call(work / "call_tb", array or csim.ArrayConfig()))
    want = run_program(shallow, s_codes[:1], e_codes[:1], feature_codes=feat)[shallow.output]
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # the testbench build and every intermediate: not kept
    same = bool(np.array_equal(r.pop("output").reshape(-1), want.reshape(-1)))
    return {**rec, "bit_exact": same and r["bit_exact"], "buffers_compared": r["buffers_compared"],
            "array_cycles": r["array_cycles"], "csim_seconds": r["csim_seconds"]}


class CachedFpgaDenoiser(FpgaCallDenoiser):
    """The project with a DeepCache schedule, called like TorchDenoiser: the whole-call program on full
    steps (keeping the feature's codes), the shallow program on the others. `cache.calls` counts them."""

    def __init__(self, project: Path, csim_calls: int = 2, array: Any = None) -> None:
        from edgediff.deepcache import CacheSteps
        from edgediff.files import read_json

        super().__init__(project, csim_calls, array)
        folder = Path(project) / SHALLOW_DIR
        self.shallow = load_program(folder)
        self.record = read_json(folder / CACHE_FILE)
        if self.program.feature is None or self.shallow.feature != self.program.feature:
            raise BadInput(f"{folder}: the shallow program's feature buffer is not the whole-call program's")
        self.cache = CacheSteps(self.record)
        self.depth = int(self.record["depth"])

    def __call__(self, x: Any, t: Any, cond: Any = None) -> Any:
        full, c = self.cache.next(float(t.reshape(-1)[0]))
        s_codes, e_codes = self.codes(x, t, cond)
        if full:
            bufs = self.run(self.program, s_codes, e_codes)
            assert self.program.feature is not None
            self.cache.store(c, bufs[self.program.feature])
            return self.finish(self.program, s_codes, e_codes, bufs[self.program.output])
        feat = self.cache.feats[c]
        acc = self.run(self.shallow, s_codes, e_codes, feat)[self.shallow.output]
        return self.finish(self.shallow, s_codes, e_codes, acc, feat)

    def runtime_report(self) -> dict[str, Any]:
        rep = super().runtime_report()
        rep["cache"] = {"depth": self.depth, "calls": dict(self.cache.calls), "shallow_program": self.shallow.summary()}
        return rep
