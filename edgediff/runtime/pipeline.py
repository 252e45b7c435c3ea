"""Text-to-image from a pipeline bundle with numpy, onnxruntime and `tokenizers` only (no torch).

The loop is diffusers' StableDiffusionPipeline's: tokenize (pad to max_length) -> text encoder
last_hidden_state for the prompts and, with guidance > 1, for the negative prompts ("" by
default); latents `randn((n, C, h, w)) * init_noise_sigma` from a torch-compatible generator;
per timestep one denoiser batch [uncond; cond] on scale_model_input(latents), then
noise = u + g (c - u) and scheduler.step (stochastic steps draw from the same generator);
VAE decode of latents / scaling_factor + shift; images clipped to [-1, 1].

`low_memory`: each component's session is created right before its stage and released after it
(text encoder, then denoiser, then VAE decoder), so peak memory is the largest component's, as
phones must run it; otherwise all sessions are created first.
"""

from __future__ import annotations

import gc
import inspect
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput
from edgediff.runtime.bundle import OUTPUT_NAME, ROLE_FULL, Bundle, read_bundle
from edgediff.runtime.generate import conditioning, make_scheduler, open_entry, sample_shape_for, write_grid
from edgediff.runtime.rng import TorchGenerator
from edgediff.runtime.tokenizer import BundleTokenizer

F32 = np.float32


def is_text_pipeline(bundle: Bundle) -> bool:
    p = bundle.manifest.get("pipeline") or {}
    return bool(p.get("text_encoder") or p.get("vae_decoder"))


def _rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 if sys.platform != "darwin" else 1024 * 1024), 1)


class _Sessions:
    """Creates component sessions on demand (and releases them in low-memory mode), timing the loads."""

    def __init__(self, bundle: Bundle, threads: int | None, low_memory: bool) -> None:
        self.bundle, self.threads, self.low_memory = bundle, threads, low_memory
        self.open: dict[str, Any] = {}  # role -> OrtEntry / LiteRTEntry
        self.load_ms = 0.0
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.runtime = ""

    def get(self, role: str) -> Any:
        if role not in self.open:
            t0 = time.perf_counter()
            self.open[role] = open_entry(self.bundle, role, self.threads)  # the runtime of the component's file
            self.runtime = self.open[role].runtime
            self.load_ms += (time.perf_counter() - t0) * 1e3
        return self.open[role]

    def done(self, role: str) -> None:
        e = self.open.get(role)
        if e is None:
            return
        self.ms[role] = self.ms.get(role, 0.0) + e.ms
        self.calls[role] = self.calls.get(role, 0) + e.calls
        e.ms, e.calls = 0.0, 0
        if self.low_memory:
            del self.open[role]
            del e
            gc.collect()

    def preload(self, roles: list[str]) -> None:
        if not self.low_memory:
            for r in roles:
                self.get(r)


def read_embeds_file(path: Path, readers: dict[str, Callable[[Path], dict[str, Any]]], kinds: str) -> dict[str, Any]:
    """The tensors of a prompt-embeddings file through the reader for its suffix; BadInput naming the file when
    it is missing, of another kind (`kinds` says which are read) or unreadable. Shared with edgediff.generate."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    reader = readers.get(path.suffix)
    if reader is None:
        raise BadInput(f"{path}: expected a {kinds} file of prompt embeddings")
    try:
        return reader(path)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many kinds
        raise BadInput(f"{path}: not a readable embeddings file ({e.__class__.__name__})") from None


def embeds_by_input(raw: dict[str, Any], inputs: Iterable[str], path: Path, what: str) -> Iterator[tuple[str, str, Any]]:
    """(key, input name, tensor) for every tensor of an embeddings file, `negative_<name>` read as input <name>;
    BadInput for a tensor that is no input of `what`. Shared with edgediff.generate."""
    names = list(inputs)
    for key, v in raw.items():
        name = key[len("negative_"):] if key.startswith("negative_") else key
        if name not in names:
            raise BadInput(f"{path}: tensor {key!r} is not an input of {what} (inputs: {', '.join(names)})")
        yield key, name, v


def _safetensors_numpy(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(str(path), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_embeds(path: Path, bundle: Bundle, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(conditioning, unconditional conditioning) by denoiser input name from a .npz / .safetensors (read with
    numpy) of tensors named like the inputs (encoder_hidden_states, pooled_projections, ...), with or without a
    batch axis of 1 or n, optionally `negative_<name>` for the unconditional branch (zeros otherwise, as the
    PyTorch side's generate --prompt-embeds does)."""
    raw = read_embeds_file(path, {".safetensors": _safetensors_numpy, ".npz": _npz}, ".npz or .safetensors")
    comp = bundle.component(ROLE_FULL)
    assert comp is not None
    inputs = {k: v for k, v in (comp[1].get("inputs") or {}).items() if k not in ("sample", "timestep")}
    pos: dict[str, np.ndarray] = {}
    neg: dict[str, np.ndarray] = {}
    for key, name, v in embeds_by_input(raw, inputs, path, "this bundle's denoiser"):
        want = [d for d in inputs[name]["shape"][1:]]
        v = np.asarray(v)
        if v.ndim == len(want):
            v = v[None]
        if v.ndim != len(want) + 1 or v.shape[0] not in (1, n) or any(
                isinstance(d, int) and d != s for d, s in zip(want, v.shape[1:])):
            raise BadInput(f"{path}: {key!r} has shape {tuple(v.shape)}; the denoiser takes {want} (with a batch of "
                           f"1 or {n} first)")
        (neg if key.startswith("negative_") else pos)[name] = np.broadcast_to(v, (n, *v.shape[1:])).astype(F32)
    missing = [k for k in inputs if k not in pos and k != "class_labels"]
    if missing:
        raise BadInput(f"{path}: no tensor for the denoiser input(s) {missing}")
    return pos, {k: neg.get(k, np.zeros_like(v)) for k, v in pos.items()}


def class_labels(pipe: dict[str, Any], prompts: list[str], n: int, where: str) -> np.ndarray:
    """Class labels of a class-conditional pipeline: names looked up in its id2label (as DiTPipeline's
    get_label_ids), or numbers; without a prompt, 0, 1, 2, ... (every class in turn)."""
    n_classes = int(pipe["num_classes"])
    if not any(prompts):
        return (np.arange(n) % n_classes).astype(np.int64)
    names: dict[str, int] = {}
    for k, v in (pipe.get("id2label") or {}).items():
        for name in str(v).split(","):
            names[name.strip()] = int(k)
    out = []
    for p in prompts:
        p = p.strip()
        if p in names:
            out.append(names[p])
        elif p.isdigit() and int(p) < n_classes:
            out.append(int(p))
        else:
            raise BadInput(f"{where}: {p!r} is not a class of this pipeline (a class name from its id2label, "
                           f"or a number below {n_classes})")
    return np.asarray(out, np.int64)


def encode(bundle: Bundle, sessions: _Sessions, prompts: list[str]) -> tuple[np.ndarray, float]:
    """(N, seq, hidden) float32 text encoder states of `prompts`, tokenizer ms."""
    p = bundle.manifest["pipeline"]
    tc = p.get("tokenizer_config") or {}
    t0 = time.perf_counter()
    name = p.get("tokenizer") or "tokenizer"
    comp = (bundle.manifest["components"].get(name) or {})
    tok = BundleTokenizer(bundle.path / str(comp.get("path", f"{name}/tokenizer.json")), int(tc.get("max_length", 77)),
                          int(tc.get("pad_token_id", 0)))
    ids = tok(prompts)
    tok_ms = (time.perf_counter() - t0) * 1e3
    te = sessions.get("text_encoder")
    states = te.run(["last_hidden_state"], {"input_ids": ids})[0].astype(F32)
    return states, tok_ms


def encode_named(bundle: Bundle, sessions: _Sessions, prompts: list[str], negatives: list[str], cfg: bool,
                 no_negative: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """(conditional, unconditional) denoiser inputs of an SDXL / SD3 bundle (manifest `encoding`) and tokenizer ms,
    combined from its text encoders as edgediff.pipelines.encode.encode_conditioning (diffusers' encode_prompt):
    penultimate hidden states side by side; SDXL: the last pooled projection as text_embeds, time_ids, zeros for
    the unconditional branch when no negative prompt is given and the pipeline forces them; SD3: padded to the
    joint width, then T5's last hidden state (zeros without a T5), both pooled projections as pooled_projections;
    PixArt: prompts lower-cased and stripped, the T5's last hidden state with its attention mask, the mask also
    the denoiser's encoder_attention_mask."""
    p = bundle.manifest["pipeline"]
    comps = bundle.manifest["components"]
    kinds = p.get("text_encoder_kinds") or {}
    n = len(prompts)
    zeros = p["encoding"] == "sdxl" and no_negative and bool(p.get("force_zeros_for_empty_prompt", True))
    texts = prompts + (negatives if cfg and not zeros else [])
    if p.get("text_preprocessing") == "lower_strip":
        texts = [t.lower().strip() for t in texts]
    states, pooled, tok_ms = [], [], 0.0
    t5: np.ndarray | None = None
    t5_mask: np.ndarray | None = None
    for name in p["text_encoders"]:
        tname = "tokenizer" + name[len("text_encoder"):]
        tc = (p.get("tokenizer_configs") or {}).get(tname) or {}
        t0 = time.perf_counter()
        tok = BundleTokenizer(bundle.path / str(comps[tname]["path"]), int(tc.get("max_length", 77)),
                              int(tc.get("pad_token_id", 0)))
        ids, mask = tok.encode(texts)
        tok_ms += (time.perf_counter() - t0) * 1e3
        if kinds.get(name) == "t5":  # the graph takes attention_mask only where the pipeline feeds it (PixArt)
            t5 = sessions.get(name).run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
            t5, t5_mask = t5.astype(F32), mask.astype(F32)
            sessions.done(name)
            continue
        if p["encoding"] == "flux":  # FluxPipeline: the CLIP gives its pooled output only
            pooled.append(sessions.get(name).run(["pooler_output"], {"input_ids": ids})[0].astype(F32))
            sessions.done(name)
            continue
        outs = list(comps[name].get("outputs") or [])
        layers = sorted((o for o in outs if o.startswith("hidden_states.")), key=lambda o: int(o.split(".")[1]))
        pool = "text_embeds" if "text_embeds" in outs else "pooler_output"
        h, pl = sessions.get(name).run([layers[-1], pool], {"input_ids": ids})  # optimum's: the last is penultimate
        sessions.done(name)
        states.append(h.astype(F32))
        pooled.append(pl.astype(F32))
    if p["encoding"] == "flux":  # T5 states as encoder_hidden_states, the CLIP's pooled output as pooled_projections
        assert t5 is not None and pooled
        both = {"encoder_hidden_states": t5, "pooled_projections": pooled[0]}
    elif p["encoding"] == "pixart":
        assert t5 is not None and t5_mask is not None
        both = {"encoder_hidden_states": t5, str(p.get("attention_mask_input") or "encoder_attention_mask"): t5_mask}
    elif p["encoding"] == "sdxl":
        hidden = np.concatenate(states, -1)
        vec = pooled[-1]
        ids6 = np.tile(np.asarray(p["time_ids"], F32), (n, 1))
        both = {"encoder_hidden_states": hidden, "text_embeds": vec}
    else:
        width = int(p["hidden_width"])
        hidden = np.concatenate(states, -1)
        hidden = np.pad(hidden, ((0, 0), (0, 0), (0, width - hidden.shape[-1])))
        if t5 is None:  # SD3 without its T5: zeros, as diffusers
            t5 = np.zeros((hidden.shape[0], int(p["t5_sequence"]), width), F32)
        both = {"encoder_hidden_states": np.concatenate([hidden, t5], 1).astype(F32),
                "pooled_projections": np.concatenate(pooled, -1)}
    cond = {k: v[:n] for k, v in both.items()}
    uncond: dict[str, np.ndarray] = {}
    if cfg:
        uncond = {k: np.zeros_like(v) for k, v in cond.items()} if zeros else {k: v[n:] for k, v in both.items()}
    if p["encoding"] == "sdxl":
        cond["time_ids"] = ids6
        if cfg:
            uncond["time_ids"] = ids6.copy()
    return cond, uncond, tok_ms


def initial_latents(g: TorchGenerator, n: int, shape: tuple[int, ...], grid: Any = None) -> np.ndarray:
    """randn((n, *shape)); 2x2-packed tokens (shape (h*w, 4C), grid [h, w]) drawn as FluxPipeline.prepare_latents:
    randn((n, C, 2h, 2w)) then packed, so a seed gives the PyTorch pipeline's latents."""
    if not grid or len(shape) != 2:
        return g.randn((n, *shape))
    h, w = (int(v) for v in grid)
    c = int(shape[1]) // 4
    x = g.randn((n, c, 2 * h, 2 * w))
    return x.reshape(n, c, h, 2, w, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n, h * w, 4 * c)


def unpack_latents(x: np.ndarray, grid: Any) -> np.ndarray:
    """Packed 2x2 latent tokens (N, h*w, 4C) -> (N, C, 2h, 2w), as FluxPipeline._unpack_latents."""
    h, w = (int(v) for v in grid)
    n, _, c4 = x.shape
    return np.ascontiguousarray(x.reshape(n, h, w, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)).reshape(
        n, c4 // 4, 2 * h, 2 * w)


def set_timesteps(sched: Any, bundle: Bundle, steps: int, shape: tuple[int, ...], own: bool) -> None:
    """Timesteps as the PyTorch pipeline sets them: with its own scheduler, the class's sigmas (FluxPipeline:
    linspace(1, 1/N, N)); a dynamically shifted flow schedule gets mu from the image token count."""
    from edgediff.runtime.schedulers import calculate_shift

    kw: dict[str, Any] = {}
    pipe = bundle.manifest.get("pipeline") or {}
    if own and pipe.get("sigmas") == "linspace":
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if sched.config.get("use_dynamic_shifting"):
        seq = int(shape[0]) if len(shape) == 2 else int(shape[-2] // 2) * int(shape[-1] // 2)
        kw["mu"] = calculate_shift(sched.config, seq)
    takes = inspect.signature(sched.set_timesteps).parameters  # ports without custom sigmas/mu take steps only
    sched.set_timesteps(steps, **{k: v for k, v in kw.items() if k in takes})


def run_pipeline(path: Path | str, prompt: str | list[str] = "", negative_prompt: str | list[str] | None = None,
                 samples: int = 1, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 sampler: str | None = None, eta: float | None = None, batch_size: int = 16,
                 threads: int | None = None, low_memory: bool = False, decode: bool = True,
                 prompt_embeds: Path | str | None = None, height: int | None = None,
                 width: int | None = None, duplicated_rows: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(latents (N, C, h, w), images (N, 3, H, W) in [-1, 1] or None, stats).

    `duplicated_rows`: with class-conditional guidance (DiT) the scheduler steps the duplicated
    [x; x] batch and keeps the first half, as diffusers' DiTPipeline does, so a stochastic sampler
    draws its noise for 2N rows as there; False steps the N rows as edgediff's PyTorch sampler
    (the same numbers for deterministic samplers).

    `prompt_embeds`: precomputed conditioning for bundles without a text encoder (SD3, PixArt, ...),
    see load_embeds."""
    t_start = time.perf_counter()
    bundle = read_bundle(path)
    pipe = bundle.manifest.get("pipeline") or {}
    shape = sample_shape_for(bundle, height, width)  # before any session: a wrong size fails at once
    if samples < 1:
        raise BadInput(f"number of samples must be >= 1, got {samples}")
    prompts = [prompt] * samples if isinstance(prompt, str) else list(prompt)
    if len(prompts) != samples:
        prompts = [prompts[i % len(prompts)] for i in range(samples)]
    g_scale = float(pipe.get("default_guidance") or 1.0) if guidance is None else float(guidance)
    if g_scale < 0:
        raise BadInput(f"--guidance must be >= 0, got {g_scale}")
    has_text = bool(pipe.get("text_encoder"))
    n_classes = int(pipe.get("num_classes") or 0)
    labels = None
    if not has_text and n_classes:
        labels = class_labels(pipe, prompts, samples, where=str(bundle.path))
    elif not has_text and (any(prompts) or negative_prompt):
        raise BadInput(f"{bundle.path}: this bundle has no text encoder; it takes no --prompt/--negative-prompt"
                       + (" (pass --prompt-embeds FILE)" if bundle.signature.get("cond_shape") else ""))
    cond: dict[str, np.ndarray] = {}
    uncond: dict[str, np.ndarray] = {}
    if prompt_embeds is not None:
        if has_text:
            raise BadInput(f"{bundle.path}: has its own text encoder; pass --prompt, not --prompt-embeds")
        cond, uncond = load_embeds(Path(prompt_embeds), bundle, samples)
    sig_inputs = {s["name"]: s for s in bundle.signature.get("extra") or []}
    embedded = "guidance" in sig_inputs  # guidance-distilled (Flux-dev): G is an input, no classifier-free batch
    cfg = (has_text or labels is not None or bool(cond)) and g_scale > 1.0 and not embedded
    sessions = _Sessions(bundle, threads, low_memory)
    sessions.preload([r for r, on in (("text_encoder", has_text), (ROLE_FULL, True),
                                      ("vae_decoder", decode and bool(pipe.get("vae_decoder")))) if on])
    tok_ms = 0.0
    if has_text:
        negs = [negative_prompt] * samples if isinstance(negative_prompt, str) or negative_prompt is None \
            else list(negative_prompt)
        negs = ["" if n is None else n for n in negs]
        if len(negs) != samples:
            raise BadInput(f"{len(negs)} negative prompts for {samples} samples")
        if pipe.get("encoding"):  # several text encoders (SDXL, SD3)
            cond, uncond, tok_ms = encode_named(bundle, sessions, prompts, negs, cfg, negative_prompt is None)
        else:
            states, tok_ms = encode(bundle, sessions, prompts + (negs if cfg else []))
            cond = {"encoder_hidden_states": states[:samples]}
            uncond = {"encoder_hidden_states": states[samples:]} if cfg else {}
            sessions.done("text_encoder")
    # inputs a pipeline fills itself (Flux: img_ids grid, txt_ids zeros, the guidance embedding's G)
    fixed = [k for k, v in sig_inputs.items() if k not in cond and v.get("fill") in ("zeros", "const", "grid")]
    if fixed:
        filled = conditioning({"extra": [sig_inputs[k] for k in fixed]}, samples, seed)
        if embedded and guidance is not None and "guidance" in filled:
            filled["guidance"] = np.full((samples,), float(guidance), F32)
        cond.update(filled)
        if cfg:
            uncond.update({k: v.copy() for k, v in filled.items()})
    n_steps = int(bundle.manifest["steps"] if steps is None else steps)
    sched, sampler_name = make_scheduler(bundle, sampler, eta)
    grid = pipe.get("packed_grid")
    set_timesteps(sched, bundle, n_steps, shape, own=sampler is None or sampler == bundle.manifest.get("sampler"))
    g = TorchGenerator(seed)
    x = (initial_latents(g, samples, shape, grid) * F32(sched.init_noise_sigma)).astype(F32)
    den = sessions.get(ROLE_FULL)
    sched_ms = 0.0
    for t in sched.timesteps:
        ts0 = time.perf_counter()
        xin = sched.scale_model_input(x, t)
        sched_ms += (time.perf_counter() - ts0) * 1e3
        outs = []
        for a in range(0, samples, batch_size):
            b = min(a + batch_size, samples)
            if cfg and labels is not None:
                # DiT's guidance: [cond; null class] in one batch, guided on the latent channels only
                xb = np.concatenate([xin[a:b], xin[a:b]])
                lab = np.concatenate([labels[a:b], np.full((b - a,), int(pipe["null_class"]), np.int64)])
                feeds = {"sample": xb, "timestep": np.full((2 * (b - a),), float(t), F32), "class_labels": lab}
                o = den.run([OUTPUT_NAME], feeds)[0].astype(F32)
                oc, ou = o[: b - a], o[b - a:]
                c = x.shape[1]
                o = oc.copy()
                o[:, :c] = ou[:, :c] + F32(g_scale) * (oc[:, :c] - ou[:, :c])
            elif labels is not None:
                feeds = {"sample": xin[a:b], "timestep": np.full((b - a,), float(t), F32), "class_labels": labels[a:b]}
                o = den.run([OUTPUT_NAME], feeds)[0].astype(F32)
            elif cfg:
                xb = np.concatenate([xin[a:b], xin[a:b]])
                feeds = {"sample": xb, "timestep": np.full((2 * (b - a),), float(t), F32)}
                feeds.update({k: np.concatenate([uncond[k][a:b], v[a:b]]) for k, v in cond.items()})
                o = den.run([OUTPUT_NAME], feeds)[0].astype(F32)
                ou, oc = o[: b - a], o[b - a:]
                o = ou + F32(g_scale) * (oc - ou)
            else:
                feeds = {"sample": xin[a:b], "timestep": np.full((b - a,), float(t), F32)}
                feeds.update({k: v[a:b] for k, v in cond.items()})
                o = den.run([OUTPUT_NAME], feeds)[0].astype(F32)
            outs.append(o)
        out = np.concatenate(outs)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-variance models: the second half is the variance
        ts0 = time.perf_counter()
        if labels is not None and cfg and duplicated_rows:
            x = sched.step(np.concatenate([out, out]), t, np.concatenate([x, x]), generator=g)[:samples]
        else:
            x = sched.step(out, t, x, generator=g)
        sched_ms += (time.perf_counter() - ts0) * 1e3
    sessions.done(ROLE_FULL)
    if grid:  # packed tokens -> (N, C, H, W), as FluxPipeline._unpack_latents before the VAE
        x = unpack_latents(x, grid)
    images = None
    if decode and pipe.get("vae_decoder"):
        z = (x / F32(pipe.get("vae_scaling_factor", 1.0)) + F32(pipe.get("vae_shift_factor") or 0.0)).astype(F32)
        vae = sessions.get("vae_decoder")
        images = np.concatenate([vae.run(["sample"], {"latent_sample": z[a:a + batch_size]})[0]
                                 for a in range(0, samples, batch_size)]).astype(F32)
        images = np.clip(images, -1.0, 1.0)
        sessions.done("vae_decoder")
    seconds = time.perf_counter() - t_start
    comp_ms = {k: round(v, 2) for k, v in sessions.ms.items()}
    comp_ms.update({"tokenizer": round(tok_ms, 2), "scheduler": round(sched_ms, 2), "load": round(sessions.load_ms, 2)})
    n_ts = len(sched.timesteps)
    stats: dict[str, Any] = {
        "bundle": str(bundle.path), "runtime": sessions.runtime, "kind": "pipeline", "pipeline": pipe.get("class"),
        "sampler": sampler_name, "steps": n_steps, "samples": samples, "seed": seed,  # PLMS runs steps + 1 timesteps
        "guidance": (float(cond["guidance"][0]) if embedded and "guidance" in cond
                     else g_scale if (has_text or labels is not None or cond) else None),
        "conditioning": "prompt" if has_text else ("prompt_embeds" if cond else ("class_labels" if labels is not None
                                                                                else None)), "classifier_free_guidance": cfg,
        "class_labels": labels.tolist() if labels is not None else None,
        "prompt": prompts[0] if len(set(prompts)) == 1 else prompts,
        "negative_prompt": negative_prompt,
        # denoiser evaluations per image batch, counted as the PyTorch generate counts them (x2 with guidance)
        "denoiser_calls": n_ts * (2 if cfg else 1), "denoiser_calls_full": n_ts * (2 if cfg else 1),
        "denoiser_calls_shallow": 0, "cache": None,
        "seconds": round(seconds, 3), "ms_per_image": round(seconds * 1e3 / samples, 3),
        "sampling_ms_per_image": round((sum(sessions.ms.values()) + sched_ms + tok_ms) / samples, 3),
        "component_ms": comp_ms, "low_memory": low_memory, "peak_rss_mb": _rss_mb(),
        "torch_imported": "torch" in sys.modules and sys.modules["torch"] is not None,
    }
    return x, images, stats


def generate_pipeline(path: Path | str, samples: int = 1, seed: int = 0, steps: int | None = None,
                      sampler: str | None = None, eta: float | None = None, batch_size: int = 16,
                      threads: int | None = None, save_npy: Path | str | None = None, output: Path | str | None = None,
                      prompt: str | None = None, negative_prompt: str | None = None, guidance: float | None = None,
                      low_memory: bool = False, prompt_embeds: Path | str | None = None, height: int | None = None,
                      width: int | None = None, **_: Any) -> dict[str, Any]:
    """`edgediff generate BUNDLE --prompt ...`: the PNG holds the decoded images, `save_npy` the final latents
    (model space, as for every bundle). Returns the JSON-able report of run_pipeline."""
    x, images, stats = run_pipeline(path, prompt or "", negative_prompt, samples=samples, seed=seed, steps=steps,
                                    guidance=guidance, sampler=sampler, eta=eta, batch_size=batch_size,
                                    threads=threads, low_memory=low_memory, prompt_embeds=prompt_embeds,
                                    height=height, width=width)
    if save_npy is not None:
        np.save(str(save_npy), x)
        stats["save_npy"] = str(save_npy)
    if output is not None:
        write_grid(images if images is not None else x, Path(output))
        stats["output"] = str(output)
    return stats
