"""The command line (contract: docs/architecture.md, "Command line"). Tables and --json to stdout, the rest to stderr."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from edgediff.errors import BadInput, EdgediffError
from edgediff.safety import MAX_SAMPLES, MAX_STEPS, check_count, check_output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edgediff: compress, export, verify and profile diffusion models for edge devices.")
# markup=False: file names and user strings such as "[bold]a.pt" are printed as they are, never styled
err = Console(stderr=True, markup=False)
out = Console(markup=False)

# Third-party loggers and progress bars (LiteRT/TF/absl, coremltools, torch, onnxruntime, tqdm) are
# silenced unless --verbose: our own progress and tables are what a run prints.
_NOISY_LOGGERS = ("absl", "tensorflow", "tf2onnx", "coremltools", "torch", "torch._dynamo", "torch.export",
                  "torch.onnx", "onnxruntime", "onnxscript", "litert_torch", "ai_edge_torch", "ai_edge_quantizer",
                  "diffusers", "nncf", "openvino", "hls4ml", "pyopencl", "urllib3", "PIL")


class _Captured(logging.Handler):
    """Third-party log records and Python warnings kept in memory (the last 20,000 lines), not
    printed; commands with an output folder write them to OUTPUT/edgediff.log (write_captured_log)."""

    MAX = 20_000

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a library's bad log call must not fail a command
            return
        del self.lines[: -self.MAX]


CAPTURED = _Captured()


def quiet_third_party(verbose: bool) -> None:
    """Capture other libraries' logs and warnings unless `verbose` (set before they are imported):
    their loggers and `py.warnings` go to CAPTURED instead of stderr; the env variables of the
    C++ libraries (TF/absl/glog, onnxruntime) and tqdm turn their console output off."""
    import os
    import warnings

    if verbose:
        for name in (*_NOISY_LOGGERS, "py.warnings"):
            lg = logging.getLogger(name)
            lg.removeHandler(CAPTURED)
            lg.propagate = True
        logging.captureWarnings(False)
        return
    for k, v in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("GLOG_minloglevel", "2"), ("ABSL_MIN_LOG_LEVEL", "2"),
                 ("TQDM_DISABLE", "1"), ("ORT_LOGGING_LEVEL", "3"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(k, v)
    for name in (*_NOISY_LOGGERS, "py.warnings"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.INFO if name == "py.warnings" else logging.WARNING)
        if CAPTURED not in lg.handlers:
            lg.addHandler(CAPTURED)
        lg.propagate = False
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each warning once per place, into the log


def write_captured_log(folder: Path) -> Path | None:
    """OUTPUT/edgediff.log: the third-party logs and warnings this run captured (None when none)."""
    try:
        from edgediff.exporters.base import NATIVE_LOG
    except ImportError:  # no torch: nothing native was captured
        NATIVE_LOG = []
    lines = CAPTURED.lines + (["-- native libraries (stdout/stderr of exports and runtime loads):", *NATIVE_LOG]
                              if NATIVE_LOG else [])
    if not lines or not folder.is_dir():
        return None
    path = folder / "edgediff.log"
    path.write_text("\n".join(lines) + "\n")
    return path


def _device_help() -> str:
    """--device's help with the device names of the estimator's table."""
    from edgediff.profiling.estimate import device_names

    return "Estimate for a device that is not attached: " + ", ".join(device_names()) + "."


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="Show third-party logs, warnings and progress bars (hidden by default)."),
             threads: Optional[int] = typer.Option(None, "--threads", min=1, help=(
                 "Threads for every runtime a command drives (torch, onnxruntime, LiteRT, OpenVINO); default: all "
                 "cores. On a shared machine pass a small number, e.g. --threads 2."))) -> None:
    """edgediff: compress, export, verify and profile diffusion models for edge devices."""
    quiet_third_party(verbose)
    _bundle_threads[0] = threads
    try:
        from edgediff.exporters.base import capture_native_output, set_threads
    except ImportError:  # no torch installed: only bundles run (edgediff.runtime), they take the count themselves
        return
    set_threads(threads)
    capture_native_output(not verbose)


_bundle_threads: list[Optional[int]] = [None]  # --threads for torch-free bundle runs
# Libraries print progress to stdout (litert-torch's converter does); main() points sys.stdout at
# stderr while a command runs so that stdout carries only our tables and our one JSON object.
_stdout = sys.stdout
_in_main = False  # main() redirects sys.stdout; `app` invoked directly (typer's CliRunner) does not


def _json_safe(v: Any) -> Any:
    """JSON has no NaN/Infinity: a non-finite figure is written as null (the key stays)."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _write_json(data: Any) -> None:
    stream = _stdout if _in_main else sys.stdout
    stream.write(json.dumps(_json_safe(data), indent=2, default=str, allow_nan=False) + "\n")
    stream.flush()


# ---------------------------------------------------------------- helpers
def _shape(text: Optional[str], flag: str) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise BadInput(f"{flag} {text!r}: expected comma-separated integers, e.g. 4,64,64") from None
    if not dims or any(d <= 0 for d in dims):
        raise BadInput(f"{flag} {text!r}: dimensions must be positive")
    return dims


def _inputs(items: Optional[list[str]]) -> dict[str, tuple[int, ...]]:
    """--input NAME=D1,D2 (repeatable): per-input shape overrides (without the batch axis)."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.partition("=")
        if not sep or not name:
            raise BadInput(f"--input {item!r}: expected NAME=D1,D2,..., e.g. text_embeds=1280")
        out[name.strip()] = _shape(dims, f"--input {name}") or ()
    return out


def _load(spec: str, config: Optional[Path], sample_shape: Optional[str], cond_shape: Optional[str],
          num_classes: Optional[int], trust_pickle: bool, variant: Optional[str] = None,
          adapter: Optional[Path] = None, scheduler_config: Optional[Path] = None,
          inputs: Optional[list[str]] = None) -> Any:
    from edgediff.loaders import LoadOptions, load_model

    opts = LoadOptions(config=config, sample_shape=_shape(sample_shape, "--sample-shape"),
                       cond_shape=_shape(cond_shape, "--cond-shape"), num_classes=num_classes,
                       trust_pickle=trust_pickle, variant=variant, adapter=adapter,
                       scheduler_config=scheduler_config, inputs=_inputs(inputs))
    if opts.sample_shape:
        from edgediff.safety import check_config_budget

        check_config_budget("", {"block_out_channels": [64]}, "--sample-shape", opts.sample_shape)
    model = load_model(spec, opts)
    if opts.sample_shape:
        _check_fits(model, spec, sample_shape or "")
    return model


def _check_fits(model: Any, spec: str, text: str) -> None:
    """A --sample-shape the denoiser cannot take is a one-line error, not a traceback later."""
    import torch

    from edgediff.safety import check_config_budget

    check_config_budget(model.arch, model.config or {}, f"--sample-shape {text}", model.signature.sample_shape)
    try:
        with torch.no_grad():
            model.module()(**model.example_inputs(batch=1))
    except Exception as e:  # noqa: BLE001 - any failure of the trial call means the shape does not fit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadInput(f"{spec}: --sample-shape {text} does not fit this model ({first})") from None


@contextmanager
def progress_bar() -> Iterator[Progress]:
    with Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err, transient=True) as p:
        yield p


def _emit(data: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        _write_json(data)
        return
    t = Table(title=title, show_header=False)
    for k, v in data.items():
        t.add_row(str(k), json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    out.print(t)


ModelOpt = typer.Argument(..., help="A diffusers folder, .safetensors, .pt2, .pt, an edgediff artifact, or 'demo'.")
ConfigOpt = typer.Option(None, "--config", help="config.json for a bare .safetensors/.pt state dict.")
SampleOpt = typer.Option(None, "--sample-shape", help="C,H,W of x_t when it cannot be inferred.")
CondOpt = typer.Option(None, "--cond-shape", help="SEQ,DIM of encoder_hidden_states (cross-attention).")
ClassesOpt = typer.Option(None, "--num-classes", help="Number of class labels (class-conditional models).")
SAMPLER_HELP = ("Scheduler (default: the model's own): ddim, ddpm, euler, euler-a, heun, dpmpp-2m, unipc, lcm, "
                "flow-euler, edm-euler, or a diffusers class name.")
VariantOpt = typer.Option(None, "--variant", help="diffusers weight variant, e.g. fp16 (model.fp16.safetensors).")
AdapterOpt = typer.Option(None, "--adapter", help="TOML describing a non-diffusers denoiser (inputs, time, schedule).")
SchedOpt = typer.Option(None, "--scheduler-config", help="A diffusers scheduler_config.json to use instead of the model's.")
InputOpt = typer.Option(None, "--input", help="NAME=D1,D2 shape override of one denoiser input (repeatable).")
PickleOpt = typer.Option(False, "--trust-pickle", help="Allow unpickling a .pt module (runs code from the file).")
PromptsOpt = typer.Option(None, "--prompts", help="Text pipelines: prompts (one a line) for calibration/verify "
                          "instead of the built-in 64.")


# ---------------------------------------------------------------- commands
def _supported() -> dict[str, Any]:
    from edgediff.signature import supported

    return supported()


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the built-in recipes and their passes."""
    from edgediff.recipe import builtin_names, load_recipe

    rows = []
    for name in builtin_names():
        r = load_recipe(name)
        rows.append({"name": name, "description": r.description, "passes": [p.name for p in r.passes]})
    if as_json:
        _write_json({"recipes": rows, **_supported()})
        return
    t = Table(title="built-in recipes")
    for c in ("name", "passes", "description"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], " -> ".join(r["passes"]) or "(none)", r["description"])
    out.print(t)
    sup = _supported()
    out.print("denoiser classes: " + ", ".join(sup["denoisers"]))
    out.print("schedulers (--sampler): " + ", ".join(f"{s['name']} ({s['class']})" for s in sup["schedulers"])
              + "; or any diffusers scheduler class name")


@app.command()
def info(target: str = typer.Argument(..., help="A model, an artifact, or an exported file."),
         as_json: bool = typer.Option(False, "--json"), config: Optional[Path] = ConfigOpt,
         sample_shape: Optional[str] = SampleOpt, cond_shape: Optional[str] = CondOpt,
         num_classes: Optional[int] = ClassesOpt, trust_pickle: bool = PickleOpt, variant: Optional[str] = VariantOpt,
         adapter: Optional[Path] = AdapterOpt, scheduler_config: Optional[Path] = SchedOpt,
         inputs: Optional[list[str]] = InputOpt) -> None:
    """Params, MACs per denoiser call and size of a model, artifact or exported file."""
    from edgediff.describe import describe

    data = describe(target, lambda: _load(target, config, sample_shape, cond_shape, num_classes, trust_pickle, variant, adapter,
                       scheduler_config, inputs))
    _emit(data, as_json, f"edgediff info {target}")


@app.command()
def compress(model: str = ModelOpt, recipe: str = typer.Option("edge", "--recipe", help="Built-in name or TOML file."),
             seed: int = typer.Option(0, "--seed"), output: Path = typer.Option(..., "-o", "--output"),
             force: bool = typer.Option(False, "--force", help="Replace an existing output."),
             as_json: bool = typer.Option(False, "--json"), config: Optional[Path] = ConfigOpt,
             sample_shape: Optional[str] = SampleOpt, cond_shape: Optional[str] = CondOpt,
             num_classes: Optional[int] = ClassesOpt, trust_pickle: bool = PickleOpt, variant: Optional[str] = VariantOpt,
         adapter: Optional[Path] = AdapterOpt, scheduler_config: Optional[Path] = SchedOpt,
         inputs: Optional[list[str]] = InputOpt,
         min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="Quality floor in dB for the recipe's "
                                                  "quant pass (min_psnr_db): the most sensitive layers stay float "
                                                  "until the final samples reach it."),
         prompts_file: Optional[Path] = PromptsOpt) -> None:
    """Run a recipe of passes and write an artifact directory."""
    from edgediff.pipeline import compress as run_compress
    from edgediff.recipe import load_recipe

    r = load_recipe(recipe)
    if min_psnr is not None:
        quants = [p for p in r.passes if p.name == "quant" and not p.component]  # the floor is the denoiser's
        if not quants:
            raise BadInput(f"{recipe}: --min-psnr needs a recipe with a quant pass (recipe {r.name!r} has none)")
        for spec in quants:
            spec.options["min_psnr_db"] = float(min_psnr)
    if output.exists() and not force:
        raise BadInput(f"{output}: output already exists (pass --force to replace it)")
    check_output(output, [model, recipe, config])
    m = _load(model, config, sample_shape, cond_shape, num_classes, trust_pickle, variant, adapter,
                       scheduler_config, inputs)
    if prompts_file is not None:  # text pipelines: calibrate on these prompts (edgediff.pipelines)
        from edgediff.pipelines.prompts import use_prompts

        use_prompts(m, prompts_file)
    data = None
    if model == "demo":  # the bundled model comes with its training digits (data-driven passes use them)
        from edgediff.demo.data import split

        data = split()["train"][0]
    with progress_bar() as p:
        from edgediff.pipelines.components import component_files  # a pipeline's other components travel along

        _, manifest = run_compress(m, r, output, seed=seed, progress=p, force=force, data=data,
                                   files=component_files(m) or None)
    write_captured_log(output)
    from edgediff.quality import print_warning

    print_warning(manifest.get("quality") or {})  # quantizing recipes: simulation vs the original model
    if as_json:
        _write_json(manifest)
        return
    t = Table(title=f"compressed with recipe {r.name!r} -> {output}")
    for c in ("pass", "seconds", "metrics"):
        t.add_column(c)
    for rec in manifest["passes"]:
        t.add_row(rec["name"], f"{rec['seconds']:.2f}", json.dumps(rec["metrics"], default=str)[:120])
    b, a = manifest["metrics"]["before"], manifest["metrics"]["after"]
    for k in ("params", "macs", "size_bytes"):
        t.add_row(k, "", f"{b[k]:,} -> {a[k]:,} ({a[k] / max(b[k], 1):.2%})")
    if manifest.get("quality"):
        q = manifest["quality"]
        t.add_row("psnr_vs_original_db", "", f"{q['psnr_vs_original_db']} dB (simulation vs the original model, "
                  f"{q['protocol']['samples']} samples x {q['protocol']['steps']} steps)")
    out.print(t)


@app.command()
def export(model: str = ModelOpt,
           target: str = typer.Option(..., "--target", help="onnx|tensorrt|coreml|tflite|opencl|fpga|openvino"),
           precision: str = typer.Option("fp32", "--precision", help="fp32|fp16|int8"),
           output: Path = typer.Option(..., "-o", "--output"),
           force: bool = typer.Option(False, "--force", help="Replace an existing output."),
           palettize: Optional[int] = typer.Option(None, "--palettize", help="Core ML: palettize weights to BITS."),
           chunk_unet: bool = typer.Option(False, "--chunk-unet", help="Core ML bundle: the UNet as Apple's "
                                           "UnetChunk1/UnetChunk2 packages."),
           as_json: bool = typer.Option(False, "--json"), config: Optional[Path] = ConfigOpt,
           sample_shape: Optional[str] = SampleOpt, cond_shape: Optional[str] = CondOpt,
           num_classes: Optional[int] = ClassesOpt, trust_pickle: bool = PickleOpt, variant: Optional[str] = VariantOpt,
         adapter: Optional[Path] = AdapterOpt, scheduler_config: Optional[Path] = SchedOpt,
         inputs: Optional[list[str]] = InputOpt) -> None:
    """Export a model or artifact to a target runtime."""
    from edgediff.exporters import PRECISIONS, get_backend

    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    backend = get_backend(target)  # the backend checks the rest of the request (edgediff.exporters.base)
    if output.exists() and not force:
        raise BadInput(f"{output}: output already exists (pass --force to replace it)")
    check_output(output, [model, config])
    options: dict[str, Any] = {}
    if palettize is not None:
        options["palettize"] = palettize
    if backend.takes_onnx_source and model.endswith(".onnx"):
        source: Any = Path(model)  # e.g. the FPGA backend also takes any QDQ-quantized ONNX
    else:
        source = _load(model, config, sample_shape, cond_shape, num_classes, trust_pickle, variant, adapter,
                       scheduler_config, inputs)
    from edgediff.bundle import BUNDLE_TARGETS, export_bundle, is_bundle_output

    with progress_bar() as p:
        # -o DIR for a file target asks for a bundle: exit 3 with the reason where none is written yet
        if is_bundle_output(output) and not options and (
                target in BUNDLE_TARGETS or (backend.suffixes and Path(output).suffix == "")):
            # -o DIR: the denoiser with its scheduler (and DeepCache's shallow graph) as a bundle
            report = export_bundle(source, output, target, precision, force=force, progress=p, chunk_unet=chunk_unet)
        elif chunk_unet:
            raise BadInput(f"{output}: --chunk-unet is for Core ML bundles (-o DIR --target coreml)")
        else:
            report = backend.export(source, output, precision, options, p, force=force).to_dict()
    _emit(report, as_json, f"exported {target} {precision} -> {output}")
    if report.get("exit_code"):
        raise typer.Exit(int(report["exit_code"]))


@app.command()
def verify(model: str = ModelOpt, exported: Path = typer.Argument(..., help="The exported file to check."),
           steps: Optional[int] = typer.Option(None, "--steps", help="Default: the sampling the artifact or bundle "
                                               "records, else 20."),
           samples: int = typer.Option(16, "--samples"),
           sampler: Optional[str] = typer.Option(None, "--sampler", help=SAMPLER_HELP), seed: int = typer.Option(0, "--seed"),
           as_json: bool = typer.Option(False, "--json"), config: Optional[Path] = ConfigOpt,
           sample_shape: Optional[str] = SampleOpt, cond_shape: Optional[str] = CondOpt,
           num_classes: Optional[int] = ClassesOpt, trust_pickle: bool = PickleOpt,
           variant: Optional[str] = VariantOpt, adapter: Optional[Path] = AdapterOpt,
           scheduler_config: Optional[Path] = SchedOpt, inputs: Optional[list[str]] = InputOpt,
           min_quality_db: float = typer.Option(25.0, "--min-quality-db",
                                                help="Quantized artifacts: warn when the export's samples are "
                                                     "fewer dB than this from the original model's."),
           prompts_file: Optional[Path] = PromptsOpt) -> None:
    """Run the exported file in its real runtime with the sampler and compare to the reference."""
    from edgediff import verify as mod
    from edgediff.quality import print_warning

    check_count(samples, "--samples", MAX_SAMPLES)
    if steps is not None:
        check_count(steps, "--steps", MAX_STEPS)
    ref = _load(model, config, sample_shape, cond_shape, num_classes, trust_pickle, variant, adapter,
                       scheduler_config, inputs)
    if prompts_file is not None:
        from edgediff.pipelines.prompts import use_prompts

        use_prompts(ref, prompts_file)
    with progress_bar() as p:
        result = mod.verify(ref, exported, steps=steps, samples=samples, sampler=sampler, seed=seed, progress=p,
                            min_quality_db=min_quality_db)
    print_warning(result)
    _emit(result, as_json, f"verify {exported}")
    if result.get("exit_code"):
        raise typer.Exit(int(result["exit_code"]))


@app.command()
def profile(exported: Path = typer.Argument(..., help="An exported model."),
            runtime: Optional[str] = typer.Option(None, "--runtime", help="ort|tflite|tensorrt|opencl|openvino"),
            device: Optional[str] = typer.Option(None, "--device", help=_device_help()),
            html: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML report here."),
            adb: Optional[str] = typer.Option(None, "--adb", help="Run LiteRT's benchmark_model on this phone."),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Per-layer latency of an exported model on a runtime here, or estimated for a device."""
    from edgediff.profiling import run as mod

    with progress_bar() as p:
        if Path(exported).is_dir() and (Path(exported) / "edgediff_bundle.json").is_file():
            # a bundle: every component, and the per-image total at its steps (edgediff.pipelines.profile)
            from edgediff.pipelines.profile import profile_bundle

            if html is not None or adb is not None:
                raise BadInput(f"{exported}: --html/--adb take one exported file; profile a component's file for them")
            result = profile_bundle(exported, runtime=runtime, device=device, progress=p)
        else:
            result = mod.profile(exported, runtime=runtime, device=device, html=html, adb=adb, progress=p)
    if as_json:
        _write_json(result)
    else:
        out.print(mod.summary_table(result))


@app.command()
def generate(model: str = typer.Argument(..., help="A model, an artifact, or an exported bundle directory."),
             output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG grid of the samples."),
             save_npy: Optional[Path] = typer.Option(None, "--save-npy", help="Final samples (N, C, H, W) float32."),
             seed: int = typer.Option(0, "--seed"), samples: int = typer.Option(4, "--samples"),
             steps: Optional[int] = typer.Option(None, "--steps", help="Default 50 (4 for LCM)."),
             sampler: Optional[str] = typer.Option(None, "--sampler", help=SAMPLER_HELP),
             guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
             prompt: Optional[str] = typer.Option(None, "--prompt", help="Text: a pipeline folder or bundle encodes it."),
             negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt",
                                                           help="Pipeline bundles: the unconditional branch's text."),
             low_memory: bool = typer.Option(False, "--low-memory",
                                             help="Pipeline bundles: load one component at a time."),
             height: Optional[int] = typer.Option(None, "--height", help="Bundles with dynamic H/W (ONNX UNet): image "
                                                  "height in pixels (the sample's without a VAE)."),
             width: Optional[int] = typer.Option(None, "--width", help="As --height, the width."),
             prompt_embeds: Optional[Path] = typer.Option(None, "--prompt-embeds",
                                                          help=".safetensors/.npz of tensors named like the inputs."),
             batch_size: int = typer.Option(16, "--batch-size"), as_json: bool = typer.Option(False, "--json"),
             config: Optional[Path] = ConfigOpt, sample_shape: Optional[str] = SampleOpt,
             cond_shape: Optional[str] = CondOpt, num_classes: Optional[int] = ClassesOpt,
             trust_pickle: bool = PickleOpt, variant: Optional[str] = VariantOpt, adapter: Optional[Path] = AdapterOpt,
             scheduler_config: Optional[Path] = SchedOpt, inputs: Optional[list[str]] = InputOpt) -> None:
    """Generate samples: a PNG grid and/or the final samples as .npy, with timing."""
    if output is None and save_npy is None:
        raise BadInput("nothing to write: pass -o OUT.png and/or --save-npy OUT.npy")
    check_count(samples, "--samples", MAX_SAMPLES)
    check_count(batch_size, "--batch-size", MAX_SAMPLES)
    if steps is not None:
        check_count(steps, "--steps", MAX_STEPS)
    for o in (output, save_npy):
        if o is not None:
            check_output(o, [model, prompt_embeds, config])
    if Path(model).is_dir() and (Path(model) / "edgediff_bundle.json").is_file():
        # an exported bundle runs torch-free in its own runtime (edgediff.runtime)
        from edgediff.runtime import generate_bundle

        with progress_bar():
            result = generate_bundle(Path(model), samples=samples, seed=seed, steps=steps, sampler=sampler,
                                     batch_size=batch_size, save_npy=save_npy, output=output, prompt=prompt,
                                     negative_prompt=negative_prompt, guidance=guidance, low_memory=low_memory,
                                     threads=_bundle_threads[0],
                                     **({"prompt_embeds": prompt_embeds} if prompt_embeds is not None else {}),
                                     **({"height": height, "width": width} if (height, width) != (None, None) else {}))
        _emit(result, as_json, f"generate {model}")
        return
    if height is not None or width is not None:
        raise BadInput(f"{model}: --height/--width apply to exported bundles with dynamic H/W (export --target onnx "
                       "-o DIR); PyTorch generate and OpenCL bundles run at the model's sample size")
    if Path(model).is_dir() and (Path(model) / "opencl_bundle.json").is_file():
        # an OpenCL bundle: edgediff's sampler with the bundle on the device (DeepCache schedule included)
        from edgediff.kernels.deepcache_sampler import generate_opencl

        with progress_bar() as p:
            result = generate_opencl(Path(model), samples=samples, seed=seed, steps=steps, sampler=sampler,
                                     save_npy=save_npy, output=output, progress=p)
        _emit(result, as_json, f"generate {model}")
        return
    from edgediff.generate import generate as run_generate

    m = _load(model, config, sample_shape, cond_shape, num_classes, trust_pickle, variant, adapter, scheduler_config,
              inputs)
    with progress_bar() as p:
        result = run_generate(m, samples=samples, seed=seed, steps=steps, sampler=sampler, guidance=guidance,
                              prompt_embeds=prompt_embeds, output=output, save_npy=save_npy, batch_size=batch_size,
                              progress=p, prompt=prompt, negative_prompt=negative_prompt)
    _emit(result, as_json, f"generate {model}")


@app.command()
def demo(output: Path = typer.Option(Path("edgediff-demo"), "-o", "--output"),
         force: bool = typer.Option(False, "--force", help="Replace an existing output."),
         samples: int = typer.Option(64, "--samples"), steps: int = typer.Option(25, "--steps"),
         seed: int = typer.Option(0, "--seed"), as_json: bool = typer.Option(False, "--json")) -> None:
    """The main job on the bundled demo model: compress, export, verify, profile, report."""
    from edgediff.demo.job import run_demo

    if output.exists() and not force:
        raise BadInput(f"{output}: output already exists (pass --force to replace it)")
    check_output(output)
    check_count(samples, "--samples", MAX_SAMPLES)
    check_count(steps, "--steps", MAX_STEPS)
    with progress_bar() as p:
        summary = run_demo(output, samples=samples, steps=steps, seed=seed, progress=p, force=force, log=err.print)
    write_captured_log(output)
    if as_json:
        _write_json(summary)
        return
    from edgediff.demo.job import summary_table

    out.print(summary_table(summary))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every atomic write removes its temp files on the way out."""


_signalled: list[int] = []


def _on_sigterm(signum: int, frame: Any) -> None:
    _signalled.append(signum)
    raise Terminated()


def _on_sigint(signum: int, frame: Any) -> None:
    _signalled.append(signum)  # typer turns KeyboardInterrupt into a plain return code 130: remember why
    raise KeyboardInterrupt()


def _pop_max_memory(args: list[str]) -> list[str]:
    """`--max-memory SIZE` is accepted anywhere on the line, for every command (safety.py's budget)."""
    from edgediff.safety import parse_size, set_max_memory

    rest, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--max-memory" or a.startswith("--max-memory="):
            value = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            set_max_memory(parse_size(value))
            i += 1 if "=" in a else 2
            continue
        rest.append(a)
        i += 1
    return rest


def _print_error(message: str) -> None:
    # one line, literally (no markup, no wrapping into several lines)
    err.print(Text("edgediff: error: ", style="red") + Text(" ".join(str(message).split())), highlight=False,
              soft_wrap=True)


def _interrupted(cause: BaseException | None) -> int:
    if isinstance(cause, Terminated):
        err.print("edgediff: interrupted (SIGTERM); nothing written")
        return 143
    err.print("edgediff: interrupted; nothing written")
    return 130


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: EdgediffError -> one line and its exit code; a bug -> traceback and 1.

    Ctrl-C and SIGTERM -> "interrupted; nothing written" (atomic writes delete their temp files),
    exit 130 / 143. A full disk or an unwritable place -> one line, exit 2.
    """
    import errno
    import signal

    try:  # typer >= 0.25 vendors click as typer._click
        from typer._click import exceptions as cex
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as cex

    global _stdout, _in_main
    _stdout = sys.stdout
    _in_main = True
    out.file = _stdout
    args = sys.argv[1:] if argv is None else list(argv)
    if not {"--help", "-h"} & set(args):
        sys.stdout = sys.stderr
    old_term = old_int = None
    _signalled.clear()
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        old_int = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        pass
    try:
        from edgediff.safety import set_max_memory

        set_max_memory(None)  # each invocation starts from the default (main() may be called in-process)
        args = _pop_max_memory(args)
        rc = app(args=args, standalone_mode=False)
        if _signalled or rc == 130:
            return _interrupted(Terminated() if signal.SIGTERM in _signalled else None)
        return rc if isinstance(rc, int) else 0
    except EdgediffError as e:
        _print_error(str(e))
        return e.exit_code
    except typer.Exit as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, KeyboardInterrupt):  # typer turns Ctrl-C into Exit(130)
            return _interrupted(cause)
        return e.exit_code
    except cex.ClickException as e:
        e.show(file=sys.stderr)
        return e.exit_code
    except typer.Abort as e:
        return _interrupted(e.__cause__ or e.__context__)
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            _print_error(f"{e.filename or 'output'}: {e.strerror}")
            return 2
        raise
    except MemoryError:
        _print_error("out of memory; lower --max-memory, the sample shape or the batch/sample counts")
        return 2
    finally:
        sys.stdout = _stdout
        _in_main = False
        out.file = None  # back to "whatever sys.stdout is" (rich), not this invocation's stream
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)


if __name__ == "__main__":
    sys.exit(main())
