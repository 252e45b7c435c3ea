"""`generate_bundle`: sample from an exported bundle with numpy and its runtime only (no torch).

The loop is the one diffusers pipelines run: noise `randn((n, *shape)) * init_noise_sigma`
from a torch-compatible generator seeded with `seed`, then for each timestep
scale_model_input -> denoiser -> scheduler.step (stochastic steps draw from the same
generator), with the numpy scheduler ports. With a DeepCache schedule the full graph runs
on the bundle's full steps and returns the deep feature it caches; the shallow graph runs
on every other step and reads that feature (one cache per batch chunk).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput, Unavailable
from edgediff.runtime.bundle import (
    FEATURE_NAME,
    MANIFEST,
    OUTPUT_NAME,
    ROLE_FULL,
    ROLE_SHALLOW,
    Bundle,
    cache_full_steps,
    read_bundle,
)
from edgediff.runtime.rng import TorchGenerator
from edgediff.runtime.schedulers import NumpyScheduler, from_config, preset_config

F32 = np.float32
# graph input types the bundles use -> numpy (text encoders take int32 ids, optimum's convention)
_NP_OF = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float16)": np.float16, "tensor(float)": F32}


class OrtEntry:
    """One ONNX graph in an onnxruntime session, fed by name with numpy arrays."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise Unavailable("running an ONNX bundle needs onnxruntime: pip install onnxruntime") from None
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadInput(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
        self.path = path
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ms = 0.0
        self.calls = 0

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [o for o in outputs if o not in self.outputs]
        if missing:
            raise BadInput(f"{self.path}: graph has no output(s) {missing} (it has {self.outputs})")
        typed = {}
        for k, v in feeds.items():
            if k not in self.input_types:
                continue
            typed[k] = v.astype(_NP_OF.get(self.input_types[k], F32))
        absent = [k for k in self.input_types if k not in typed]
        if absent:
            raise BadInput(f"{self.path}: no value for graph input(s) {absent}")
        t0 = time.perf_counter()
        res = self.session.run(outputs, typed)
        self.ms += (time.perf_counter() - t0) * 1e3
        self.calls += 1
        return res


def open_entry(bundle: Bundle, role: str, threads: int | None = None) -> Any:
    """The component with `role` in its runtime, chosen by its file: OrtEntry (.onnx),
    LiteRTEntry (.tflite, edgediff.runtime.litert) or OpenVinoEntry (.xml, edgediff.runtime.openvino);
    each runs run(outputs, feeds) by name."""
    if bundle.target == "coreml":  # .mlpackage folders: Core ML predicts on macOS only (its Swift package, coremltools)
        raise Unavailable(f"{bundle.path}: a Core ML bundle runs in Core ML, which predicts on macOS only (Apple's "
                          "ml-stable-diffusion Swift package on its Resources/, or coremltools on a Mac)")
    f = bundle.file(role)
    if f.suffix == ".onnx":
        return OrtEntry(f, threads)
    if f.suffix == ".tflite":
        from edgediff.runtime.litert import LiteRTEntry

        return LiteRTEntry(f, threads)
    if f.suffix == ".xml":
        from edgediff.runtime.openvino import OpenVinoEntry

        return OpenVinoEntry(f, threads)
    raise Unavailable(f"{f}: the numpy runtime runs .onnx, .tflite and OpenVINO .xml components, "
                      f"not {f.suffix or 'this file'}")


MAX_SIDE = 8192  # pixels: --height/--width above this are refused before any session is made


def sample_shape_for(bundle: Bundle, height: int | None, width: int | None) -> tuple[int, ...]:
    """The latent (or sample) shape to generate at: the model's own, or `height` x `width` pixels of the
    image (the sample itself for a bundle without a VAE) where every graph the run uses has dynamic H/W
    (the ONNX bundle's UNet and VAE); BadInput naming the bundle otherwise (fixed-size .tflite / Core ML
    files, DiT-class transformers with fixed positional tables) or for sizes the UNet cannot take."""
    import json

    shape = tuple(int(s) for s in bundle.signature["sample_shape"])
    if height is None and width is None:
        return shape
    for name, v in (("--height", height), ("--width", width)):
        if v is not None and not 0 < int(v) <= MAX_SIDE:
            raise BadInput(f"{name} must be in 1..{MAX_SIDE}, got {v}")
    pipe = bundle.manifest.get("pipeline") or {}
    f = int(pipe.get("vae_scale_factor") or 1) if pipe.get("vae_decoder") else 1
    h = int(height) if height is not None else shape[-2] * f
    w = int(width) if width is not None else shape[-1] * f
    den = bundle.component(ROLE_FULL)
    assert den is not None
    for role in [ROLE_FULL] + (["vae_decoder"] if pipe.get("vae_decoder") else []):
        hit = bundle.component(role)
        assert hit is not None
        dims = next(iter((hit[1].get("inputs") or {}).values()), {}).get("shape") or []
        if len(dims) < 4 or not all(isinstance(d, str) for d in dims[-2:]):
            raise BadInput(f"{bundle.path}: its {hit[0]} has a fixed size ({shape[-2] * f}x{shape[-1] * f}); "
                           "--height/--width need a bundle whose graphs have dynamic H/W (--target onnx with a UNet)")
    if h % f or w % f:
        raise BadInput(f"--height/--width must be multiples of {f} (the VAE's scale factor), got {h}x{w}")
    from edgediff.safety import child_path  # torch-free

    # the manifest names the denoiser's folder: it must stay inside the bundle
    cfg_path = child_path(bundle.path, str(pipe.get("denoiser") or den[0]), f"{bundle.path / MANIFEST}",
                          "pipeline denoiser folder") / "config.json"
    blocks = len((json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}).get("block_out_channels") or [1])
    down = 2 ** (blocks - 1)  # the UNet halves H/W at every down block but the last
    if (h // f) % down or (w // f) % down:
        raise BadInput(f"--height/--width: the latents ({h // f}x{w // f}) must be multiples of {down} for this "
                       f"UNet's {blocks} resolution levels (the image: multiples of {down * f})")
    return (*shape[:-2], h // f, w // f)


def grid_ids(h: int, w: int) -> np.ndarray:
    """(h*w, 3) position ids of a token grid (0, row, column), as FluxPipeline._prepare_latent_image_ids."""
    ids = np.zeros((int(h), int(w), 3), F32)
    ids[..., 1] = np.arange(int(h), dtype=F32)[:, None]
    ids[..., 2] = np.arange(int(w), dtype=F32)[None, :]
    return ids.reshape(-1, 3)


def conditioning(signature: dict[str, Any], n: int, seed: int) -> dict[str, np.ndarray]:
    """Example conditioning as edgediff's PyTorch side draws it for a model without its own
    encoder (InputSignature.conditioning): its own generator seeded with `seed`, encoder states
    first; class labels cycle 0..num_classes-1."""
    out: dict[str, np.ndarray] = {}
    g = TorchGenerator(seed)
    if signature.get("cond_shape"):
        out["encoder_hidden_states"] = g.randn((n, *signature["cond_shape"]))
    if signature.get("num_classes"):
        out["class_labels"] = (np.arange(n) % int(signature["num_classes"])).astype(np.int64)
    for spec in signature.get("extra") or []:
        fill = spec.get("fill", "randn")
        shape = tuple(spec["shape"])
        if fill == "zeros":
            out[spec["name"]] = np.zeros((n, *shape), F32)
        elif fill == "const":
            v = np.asarray(spec.get("value") or [0.0], np.float64)
            v = np.broadcast_to(v.reshape(()) if not shape and v.size == 1 else v, shape)  # scalar inputs (guidance)
            out[spec["name"]] = np.broadcast_to(v, (n, *shape)).astype(F32)
        elif fill == "grid" and len(spec.get("value") or ()) == 2:
            out[spec["name"]] = np.broadcast_to(grid_ids(*spec["value"]), (n, *shape)).astype(F32)
        else:
            raise BadInput(f"bundle signature: extra input {spec['name']!r} (fill {fill!r}) needs a value; "
                           "the numpy runtime fills only zeros/const/grid inputs")
    return out


def make_scheduler(bundle: Bundle, sampler: str | None, eta: float | None) -> tuple[NumpyScheduler, str]:
    """The bundle's own scheduler, or `sampler`'s preset over the model's schedule."""
    own = str(bundle.manifest.get("sampler"))
    if sampler is None or sampler == own:
        cfg, name = dict(bundle.scheduler_config), own
    elif sampler in (bundle.manifest.get("samplers") or {}):
        # the exact config the PyTorch side builds for this sampler, stored at export
        cfg, name = dict(bundle.manifest["samplers"][sampler]), sampler
    else:
        base = bundle.manifest.get("base_schedule") or bundle.scheduler_config
        cfg, name = preset_config(base, sampler), sampler
    kwargs: dict[str, Any] = {}
    e = float(bundle.manifest.get("eta", 0.0) if eta is None else eta)
    if cfg.get("_class_name") == "DDIMScheduler":
        kwargs["eta"] = e
    elif eta:
        raise BadInput(f"--eta applies to DDIM only, not {cfg.get('_class_name')}")
    return from_config(cfg, **kwargs), name


def run_bundle(path: Path | str, samples: int = 16, seed: int = 0, steps: int | None = None, sampler: str | None = None,
               eta: float | None = None, batch_size: int = 64, threads: int | None = None,
               cond: dict[str, np.ndarray] | None = None, cache: bool = True, height: int | None = None,
               width: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample `samples` images from a bundle; returns (final samples (N, C, H, W) float32, stats)."""
    t_start = time.perf_counter()
    bundle = read_bundle(path)
    if samples < 1:
        raise BadInput(f"number of samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise BadInput(f"batch size must be >= 1, got {batch_size}")
    n_steps = int(bundle.manifest["steps"] if steps is None else steps)
    sched, sampler_name = make_scheduler(bundle, sampler, eta)
    sched.set_timesteps(n_steps)
    t_load = time.perf_counter()
    full = open_entry(bundle, ROLE_FULL, threads)
    cache_cfg = bundle.cache if cache else None
    shallow = open_entry(bundle, ROLE_SHALLOW, threads) if cache_cfg else None
    load_ms = (time.perf_counter() - t_load) * 1e3
    n_ts = len(sched.timesteps)
    full_steps = set(cache_full_steps(n_ts, cache_cfg)) if cache_cfg else set(range(n_ts))
    sig = bundle.signature
    shape = sample_shape_for(bundle, height, width)
    g = TorchGenerator(seed)
    x = (g.randn((samples, *shape)) * F32(sched.init_noise_sigma)).astype(F32)
    feeds_cond = cond if cond is not None else conditioning(sig, samples, seed)
    chunks = [(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]
    feats: list[np.ndarray | None] = [None] * len(chunks)
    calls = {"full": 0, "shallow": 0}
    sched_ms = 0.0
    for i, t in enumerate(sched.timesteps):
        ts0 = time.perf_counter()
        xin = sched.scale_model_input(x, t)
        sched_ms += (time.perf_counter() - ts0) * 1e3
        outs = []
        is_full = i in full_steps
        for c, (a, b) in enumerate(chunks):
            feeds = {"sample": xin[a:b], "timestep": np.full((b - a,), float(t), F32)}
            feeds.update({k: v[a:b] for k, v in feeds_cond.items()})
            if cache_cfg is None:
                o = full.run([OUTPUT_NAME], feeds)[0]
            elif is_full:
                o, feats[c] = full.run([OUTPUT_NAME, FEATURE_NAME], feeds)
            else:
                assert shallow is not None and feats[c] is not None
                feeds[FEATURE_NAME] = feats[c]
                o = shallow.run([OUTPUT_NAME], feeds)[0]
            outs.append(o)
        calls["full" if is_full else "shallow"] += 1
        out = np.concatenate(outs).astype(F32)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-variance models: the second half is the variance
        ts0 = time.perf_counter()
        x = sched.step(out, t, x, generator=g)
        sched_ms += (time.perf_counter() - ts0) * 1e3
    seconds = time.perf_counter() - t_start
    comp_ms = {"denoiser": round(full.ms, 2), "scheduler": round(sched_ms, 2), "load": round(load_ms, 2)}
    if shallow is not None:
        comp_ms["denoiser_shallow"] = round(shallow.ms, 2)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = {
        "bundle": str(bundle.path), "runtime": full.runtime, "sampler": sampler_name, "steps": n_ts,
        "samples": samples, "seed": seed,
        "denoiser_calls": calls["full"] + calls["shallow"],
        "denoiser_calls_full": calls["full"], "denoiser_calls_shallow": calls["shallow"],
        "cache": ({"depth": cache_cfg.get("depth"), "interval": cache_cfg.get("interval"),
                   "schedule": cache_cfg.get("schedule", "uniform"), "full_steps": sorted(full_steps)}
                  if cache_cfg else None),
        "seconds": round(seconds, 3), "ms_per_image": round(seconds * 1e3 / samples, 3),
        # the denoiser-and-scheduler time alone (what a deployed loop costs), without loading
        "sampling_ms_per_image": round((full.ms + (shallow.ms if shallow else 0.0) + sched_ms) / samples, 3),
        "component_ms": comp_ms,
        "peak_rss_mb": round(rss_kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1),
        "torch_imported": "torch" in sys.modules and sys.modules["torch"] is not None,
    }
    return x, stats


def generate_bundle(path: Path | str, samples: int = 16, seed: int = 0, steps: int | None = None,
                    sampler: str | None = None, eta: float | None = None, batch_size: int = 64,
                    threads: int | None = None, save_npy: Path | str | None = None, output: Path | str | None = None,
                    cache: bool = True, prompt: str | None = None, negative_prompt: str | None = None,
                    guidance: float | None = None, low_memory: bool = False,
                    prompt_embeds: Path | str | None = None, height: int | None = None,
                    width: int | None = None) -> dict[str, Any]:
    """Generate from a denoiser bundle; writes `save_npy` (N, C, H, W) float32 and/or a PNG grid `output`.
    (Pipeline bundles with a text encoder or VAE: edgediff.runtime.pipeline.generate_pipeline.)

    Returns the JSON-able report: sampler, steps, denoiser_calls (full/shallow), seconds,
    ms_per_image, component_ms, peak_rss_mb.
    """
    if prompt_embeds is not None:
        raise BadInput(f"{path}: a denoiser-only bundle takes no --prompt-embeds; export the pipeline folder "
                       "(denoiser + VAE) to generate from precomputed embeddings")
    if prompt is not None or negative_prompt is not None or guidance is not None:
        raise BadInput(f"{path}: this bundle has no text encoder; it takes no --prompt/--negative-prompt/--guidance")
    x, stats = run_bundle(path, samples=samples, seed=seed, steps=steps, sampler=sampler, eta=eta,
                          batch_size=batch_size, threads=threads, cache=cache, height=height, width=width)
    if save_npy is not None:
        np.save(str(save_npy), x)
        stats["save_npy"] = str(save_npy)
    if output is not None:
        write_grid(x, Path(output))
        stats["output"] = str(output)
    return stats


def write_grid(x: np.ndarray, out: Path) -> None:
    """A PNG grid of samples in [-1, 1] (N, C, H, W) with C 1 or 3, written with Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise Unavailable("writing a PNG needs Pillow: pip install pillow (or use --save-npy)") from None
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise BadInput(f"{out}: cannot write {c}-channel samples as an image (use --save-npy)")
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2), c), np.uint8)
    img = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, q * (w + 2) + 1: q * (w + 2) + 1 + w] = img[k]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(str(out))
