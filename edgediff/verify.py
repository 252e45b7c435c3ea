"""The verifier: run an exported file in its real runtime with the sampler in the loop.

verify(reference, exported) finds the backend that made `exported`, loads it in its own
runtime (onnxruntime, LiteRT, the OpenCL runtime, TensorRT where present), and drives it
with the same sampler, seeds and conditioning as the reference: the reference
DiffusionModel's PyTorch module, i.e. a compressed artifact in simulation. It reports

  psnr_db      PSNR of the final samples vs the reference, over the reference samples' own
               peak-to-peak (`psnr_db_data_range`: 2 for pixel samples in [-1, 1]; latents span
               more, and a fixed 2 would score them on the wrong scale), as edgediff.quality does;
  max_abs_err  the largest |exported - reference| over single denoiser calls on fixed inputs
               (a few noise levels), before any sampler can hide or amplify it;
  verified     true only if the exported file really ran here (verification ladder rung 1/2);
  exit_code    0 within tolerance, 3 could not run here (reason says what is missing; a
               structural check is attached when the backend has one), 4 out of tolerance.

Tolerances depend on the precision the file computes in (see TOLERANCES and docs/export.md).
An fp32/fp16 export of a quantized artifact holds the artifact's on-grid float weights but not
its activation quantization, so it is compared against those float weights (the artifact with
its quantization wrappers stripped), which is exactly what the file claims to compute; an int8
export is compared against the artifact's own simulation. A sampling correction a pass attached
to the model (edgediff.passes.sampling_correction: PTQD's) is applied around both denoisers.
The backend is used only through its contract (edgediff.exporters.base.Backend).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from edgediff import quality
from edgediff.errors import BadInput, Unavailable
from edgediff.exporters import get_backend, target_of
from edgediff.exporters.base import Backend, native_output_captured
from edgediff.metrics import psnr
from edgediff.model import DiffusionModel
from edgediff.passes import sampling_correction
from edgediff.quant_params import is_quant_wrapper, strip_quant_wrappers
from edgediff.sampling import SamplerConfig, TorchDenoiser, recorded_sampling, sample, sampler_name, timesteps_for
from edgediff.sim_floor import Stepwise, noise_floor, per_sample_psnr

# Minimum final-sample PSNR (dB) and maximum single-call error per computing precision.
# fp32: only summation order differs (measured ~1e-6 per call, >80 dB after 20 DDIM steps).
# fp16: 10-bit mantissa, errors ~1e-3 per call; DDIM amplifies little.
# int8: the integer layers are bit-exact, but a float difference of 1e-6 (GroupNorm, SiLU,
#   softmax in each runtime's own kernels) in front of a quantizer can flip a rounding by one
#   step, and the sampler carries a flip to the end: the final samples sit at the simulation's
#   own noise floor (37-44 dB on the demo, edgediff.sim_floor), which no runtime controls. So the
#   runtime is judged call by call along the simulation's trajectory (stepwise_psnr_db: the worst
#   call, >= 40 dB), and the final samples must not fall below psnr_db or below the floor less
#   floor_margin_db (runtime and floor differed by up to 4.4 dB on the demo; docs/int8.md).
#   A backend with fixed-point nonlinear units (Backend.float_nonlinear_ops False: the FPGA) does not
#   compute what the float simulation computes per call; it keeps psnr_db and its own C-simulation check.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"psnr_db": 60.0, "max_abs_err": 1e-3},
    "fp16": {"psnr_db": 30.0, "max_abs_err": 5e-2},
    "int8": {"psnr_db": 25.0, "max_abs_err": 0.5, "stepwise_psnr_db": 40.0, "floor_margin_db": 6.0},
}
CHECK_TIMESTEPS = (999, 500, 50)
DEFAULT_STEPS = 20  # a model that records no sampling


def _correction(model: DiffusionModel) -> Any:
    """The sampling correction a pass attached to the model (PTQD's), or None."""
    return sampling_correction(model)


def _has_wrappers(model: DiffusionModel) -> bool:
    return any(is_quant_wrapper(m) for m in model.denoiser.modules())


def _float_reference(model: DiffusionModel) -> DiffusionModel:
    """The artifact's float weights without its simulated activation quantization (a copy)."""
    den = strip_quant_wrappers(copy.deepcopy(model.denoiser))
    return DiffusionModel(den, model.schedule, model.signature, model.arch, model.config, model.provenance,
                          model.extras)


def _info_of(backend: Backend, path: Path) -> dict[str, Any]:
    try:
        return dict(backend.info(path))
    except BadInput:  # e.g. an engine not built yet: its precision then comes from nowhere, tolerance fp32
        return {}


def _conditioning(model: DiffusionModel, n: int, seed: int) -> Any:
    # one definition shared with edgediff.quality, whose stored original samples must match it
    return quality.conditioning(model, n, seed)


@torch.inference_mode()
def single_call_error(ref: Any, exp: Any, model: DiffusionModel, seed: int = 0, batch: int = 4) -> float:
    """max |exp - ref| over fixed inputs at a few noise levels."""
    err = 0.0
    # EDM-family timesteps are c_noise = log(sigma) / 4, not indices: take three of the scheduler's own
    checks = CHECK_TIMESTEPS if model.schedule.family != "edm" else timesteps_for(model.schedule, 3)
    for t in checks:
        t = min(t, model.schedule.num_train_timesteps - 1)
        s = seed + (t if isinstance(t, int) else int(abs(t) * 1000))
        inp = model.signature.example_inputs(batch=batch, seed=s)
        tt = torch.full((batch,), float(t))
        cond = _conditioning(model, batch, s)
        a, b = ref(inp["sample"], tt, cond), exp(inp["sample"], tt, cond)
        if a.shape != b.shape:
            raise BadInput(f"exported output shape {tuple(b.shape)} differs from the reference's {tuple(a.shape)}")
        d = float((a - b).abs().max())
        if d != d:  # a NaN output: the error is NaN, never 0.0 (max(0.0, nan) is 0.0)
            return d
        err = max(err, d)
    return err


def verify(reference: DiffusionModel, exported: Path, steps: int | None = None, samples: int = 16,
           sampler: str | None = None, seed: int = 0, progress: Any = None, return_samples: bool = False,
           min_quality_db: float = quality.DEFAULT_FLOOR_DB, original: DiffusionModel | None = None) -> dict[str, Any]:
    """Run `exported` against `reference`; for a quantized reference also against the original model
    it was made from (psnr_vs_original_db, quality_warning under `min_quality_db`; edgediff.quality).
    Unset sampler/steps: the sampling the artifact records (a bundle: its manifest's), else
    the model's own scheduler at DEFAULT_STEPS."""
    exported = Path(exported)
    if samples < 1:
        raise BadInput(f"--samples must be >= 1, got {samples}")
    from edgediff.runtime import is_bundle

    if is_bundle(exported):  # a bundle runs its own sampler loop (numpy runtime), DeepCache schedule included
        from edgediff.bundle import verify_bundle

        res = verify_bundle(reference, exported, TOLERANCES, steps=steps, samples=samples, sampler=sampler,
                            seed=seed, progress=progress, return_samples=True)
        got_b = res.get("final_samples") if return_samples else res.pop("final_samples", None)
        if quality.is_quantized(reference) and isinstance(got_b, torch.Tensor):
            res.update(quality.vs_original(reference, got_b, samples, int(res["steps"]), res.get("sampler"), seed,
                                           min_quality_db, original))
        return res
    if exported.suffix.lower() in (".engine", ".plan") and not exported.exists() \
            and exported.with_suffix(".onnx").is_file():
        # `export --target tensorrt` without TensorRT wrote the ONNX and the trtexec command only
        target = "tensorrt"
    else:
        target = target_of(exported)
    sampler, rec_steps, eta = recorded_sampling(reference, sampler, steps)
    steps = rec_steps or DEFAULT_STEPS
    cfg = SamplerConfig(sampler, steps, eta or 0.0)
    result: dict[str, Any] = {"target": target, "exported": str(exported), "samples": samples, "steps": steps,
                              "sampler": sampler_name(reference.schedule, sampler), "seed": seed}
    backend = get_backend(target)
    info = _info_of(backend, exported)
    precision = info.get("precision") or "fp32"
    if target == "onnx" and info.get("made_for") == "tensorrt":
        result["note"] = ("the TensorRT-ready ONNX, run in onnxruntime: the TensorRT engine itself was not "
                          "built or run here")
    ref_dtype = next((p.dtype for p in reference.denoiser.parameters() if p.is_floating_point()), torch.float32)
    tol_key = "fp16" if precision == "fp32" and ref_dtype == torch.float16 else precision
    tol = TOLERANCES.get(tol_key, TOLERANCES["int8"])
    result.update({"precision": precision, "tolerance": dict(tol)})

    ok, why = backend.runtime_available(exported)
    if not ok:
        result.update({"verified": False, "reason": f"cannot run {target} here: {why}", "exit_code": 3,
                       "check": backend.check(exported, reference)})
        return result
    try:
        with native_output_captured():  # the runtime's native start-up messages go to the log
            exp = backend.load_denoiser(exported)
    except Unavailable as e:
        result.update({"verified": False, "reason": str(e), "exit_code": 3, "check": backend.check(exported, reference)})
        return result

    ref_model = reference
    if precision != "int8" and _has_wrappers(reference):
        ref_model = _float_reference(reference)
        result["reference"] = "artifact float weights (activation quantization is not part of a float export)"
    else:
        result["reference"] = "artifact in PyTorch" + (" (quantization simulation)" if _has_wrappers(reference) else "")
    # an export that drives a DeepCache schedule itself (an OpenCL bundle's full + shallow schedules,
    # `cache.calls`) is compared with the cached PyTorch sampler; a single file holds the full UNet only
    drives_cache = getattr(exp, "cache", None) is not None
    ref = TorchDenoiser(ref_model, use_cache=drives_cache)
    if drives_cache:
        result["cache"] = reference.extras.get("cache")
    elif reference.extras.get("cache"):
        result["cache"] = "not covered by a single-file export (export -o DIR writes the cached bundle)"
    correction = _correction(reference)
    result["ptqd_correction"] = correction is not None

    result["max_abs_err"] = single_call_error(ref, exp, reference, seed)
    cond = _conditioning(reference, samples, seed)
    result["conditioning"] = quality.conditioning_kind(reference)
    # int8: every call of the reference trajectory also goes to the export (same x_t), compared call by call
    stepwise = Stepwise(ref, exp) if precision == "int8" and _has_wrappers(reference) and not drives_cache else None
    ref_traj: Any = stepwise or ref
    if not drives_cache:  # a text pipeline's denoiser samples with its prompts and guidance, as deployed
        guide = quality.guided(reference, samples, seed)
        ref, exp, ref_traj = guide(ref), guide(exp), guide(ref_traj)
    shape = reference.signature.sample_shape
    task = progress.add_task(f"verify {target} {precision}: sampling", total=2 * len(range(steps))) if progress else None

    def tick(*_: Any) -> None:
        if progress is not None:
            progress.advance(task)

    with torch.inference_mode():
        want = sample(ref_traj, reference.schedule, shape, samples, seed, cfg, cond=cond, correction=correction,
                      on_step=tick)
        got = sample(exp, reference.schedule, shape, samples, seed, cfg, cond=cond, correction=correction, on_step=tick)
    if progress is not None:
        progress.remove_task(task)
    assert isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)
    span = quality.data_range(want)
    p = psnr(got, want, span)
    result["psnr_db"] = round(p, 3) if math.isfinite(p) else p
    result["psnr_db_data_range"] = round(span, 4)  # psnr_data_range is psnr_vs_original_db's
    if precision == "int8" and _has_wrappers(reference):
        # the same simulation with its float ops rounded differently: the floor psnr_db is bounded by
        # (a rounding flip in front of a quantizer moves a sample, whichever runtime computes it)
        result["psnr_per_sample_db"] = per_sample_psnr(got, want, span)
        result.update(noise_floor(lambda: sample(ref, reference.schedule, shape, samples, seed, cfg, cond=cond,
                                                 correction=correction), want, span))
    if stepwise is not None:
        result.update(stepwise.report())
    result["verified"] = True
    result["runtime"] = why
    if drives_cache:  # the last sampling run's calls on each side
        result.update({"denoiser_calls_full": exp.cache.calls["full"], "denoiser_calls_shallow": exp.cache.calls["shallow"],
                       "reference_calls_shallow": ref.cache.calls["shallow"]})
    within = p >= tol["psnr_db"] and result["max_abs_err"] <= tol["max_abs_err"]
    if stepwise is not None and not backend.float_nonlinear_ops:
        # fixed-point nonlinear units differ from the simulation's float ops by design: the figures are
        # reported, the rule is the trajectory's and the runtime's own consistency report
        result["stepwise_rule"] = (f"not applied: {target} computes norms, activations and softmax in fixed "
                                   "point, checked against its own C-simulation")
        stepwise = None
    if stepwise is not None:  # int8 of a simulation: per call, and the trajectory against the floor
        traj_min = min(tol["psnr_db"], result["noise_floor_db"] - tol["floor_margin_db"])
        within = (result.get("stepwise_psnr_db", math.nan) >= tol["stepwise_psnr_db"] and p >= traj_min
                  and result["max_abs_err"] <= tol["max_abs_err"])
    report = getattr(exp, "runtime_report", None)
    if callable(report):  # a runtime that checks itself (the FPGA simulator against its C-simulation)
        result["runtime_report"] = report()
        if result["runtime_report"].get("consistent") is False:
            within = False
    result["within_tolerance"] = within
    result["exit_code"] = 0 if within else 4
    if quality.is_quantized(reference):
        # matching the artifact is not enough: how far is the export from the user's original model?
        result.update(quality.vs_original(reference, got, samples, steps, sampler, seed, min_quality_db, original))
    if not within and stepwise is not None:
        result["reason"] = (f"out of tolerance for {tol_key}: worst call along the simulation's trajectory "
                            f"{result.get('stepwise_psnr_db', math.nan):.2f} dB (min {tol['stepwise_psnr_db']}), "
                            f"psnr {p:.2f} dB (min {traj_min:.2f}: {tol['psnr_db']} or the noise floor "
                            f"{result['noise_floor_db']:.2f} less {tol['floor_margin_db']}), "
                            f"max_abs_err {result['max_abs_err']:.3g} (max {tol['max_abs_err']})")
    elif not within:
        result["reason"] = (f"out of tolerance for {tol_key}: psnr {p:.2f} dB (min {tol['psnr_db']}), "
                            f"max_abs_err {result['max_abs_err']:.3g} (max {tol['max_abs_err']})")
    if return_samples:
        result["final_samples"] = got
    return result
