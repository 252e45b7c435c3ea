"""PyTorch side of a pipeline: prompt encoding with its own tokenizer and text encoder, the
classifier-free-guidance conditioning calibration and verify use, VAE decoding, and the
per-component numbers `info` shows.

Prompt encoding follows diffusers' StableDiffusionPipeline.encode_prompt: pad to the
tokenizer's model_max_length, truncate, take the text encoder's last_hidden_state; the
unconditional branch encodes the negative prompt ("" by default) padded the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from edgediff.errors import BadInput
from edgediff.pipelines.components import Pipeline


def is_t5(pipe: Pipeline, name: str) -> bool:
    return (pipe.components.get(name) or {}).get("class") == "T5EncoderModel"


def tokenizer_of(text_encoder: str) -> str:
    """text_encoder_2 -> tokenizer_2: diffusers pairs them by suffix."""
    return "tokenizer" + text_encoder[len("text_encoder"):]


def text_sequence(pipe: Pipeline, name: str) -> int:
    """Tokens the pipeline pads text encoder `name`'s prompts to: one-encoder pipelines the denoiser's sequence
    (PixArt's is its max_sequence_length), a T5 beside CLIPs the class's max_sequence_length (SD3), a CLIP
    beside others its tokenizer's model_max_length."""
    from edgediff.pipelines.components import max_sequence_length

    sig = pipe.denoiser.signature
    if encoding_of(pipe) in ("clip", "pixart") and sig.cond_shape:
        return int(sig.cond_shape[0])
    if is_t5(pipe, name):
        return max_sequence_length(pipe.class_name)
    return int(pipe.load(tokenizer_of(name)).model_max_length)


def preprocess(pipe: Pipeline, texts: list[str]) -> list[str]:
    """PixArt's _text_preprocessing without clean_caption (lower-cased, stripped): what its pipelines do when bs4
    or ftfy is missing, and what the bundle runtime does; other pipelines take prompts as given."""
    return [str(t).lower().strip() for t in texts] if encoding_of(pipe) == "pixart" else list(texts)


def encoder_inputs(pipe: Pipeline, name: str, texts: list[str]) -> dict[str, torch.Tensor]:
    """What the pipeline's encode_prompt feeds text encoder `name`: input_ids padded to text_sequence (bos/eos
    counted), and for PixArt the attention_mask too."""
    tok = pipe.load(tokenizer_of(name))
    enc = tok(preprocess(pipe, list(texts)), padding="max_length", max_length=text_sequence(pipe, name),
              truncation=True, add_special_tokens=True, return_tensors="pt")
    out = {"input_ids": enc.input_ids}
    if encoding_of(pipe) == "pixart":
        out["attention_mask"] = enc.attention_mask
    return out


def token_ids(pipe: Pipeline, prompts: list[str], name: str = "tokenizer") -> torch.Tensor:
    return encoder_inputs(pipe, "text_encoder" + name[len("tokenizer"):], prompts)["input_ids"]


@torch.no_grad()
def encoder_states(pipe: Pipeline, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden state of text encoder `name` on encoder_inputs (a CLIP projection model's too)."""
    return pipe.load(name)(**inputs, return_dict=True).last_hidden_state.float()


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str], batch: int = 16) -> torch.Tensor:
    """(N, seq, hidden) float32 encoder states of `prompts` (the text encoder's last_hidden_state)."""
    if not pipe.has("text_encoder") or not pipe.has("tokenizer"):
        raise BadInput(f"{pipe.path}: this pipeline has no text encoder and tokenizer to encode prompts with")
    inputs = encoder_inputs(pipe, "text_encoder", prompts)
    outs = [encoder_states(pipe, "text_encoder", {k: v[i:i + batch] for k, v in inputs.items()})
            for i in range(0, len(prompts), batch)]
    return torch.cat(outs)


def guided_conditioning(pipe: Pipeline, prompts: list[str], negative: list[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) encoder states for classifier-free guidance."""
    neg = negative if negative is not None else [""] * len(prompts)
    if len(neg) != len(prompts):
        raise BadInput(f"{len(neg)} negative prompts for {len(prompts)} prompts")
    both = encode_prompts(pipe, list(prompts) + list(neg))
    return both[: len(prompts)], both[len(prompts):]


@torch.no_grad()
def _clip(pipe: Pipeline, name: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, pooled output) of one CLIP text encoder, as diffusers' SDXL/SD3 pipelines take
    them (padded to the tokenizer's model_max_length; CLIPTextModelWithProjection's pooled is text_embeds)."""
    out = pipe.load(name)(**encoder_inputs(pipe, name, prompts), output_hidden_states=True)
    return out.hidden_states[-2].float(), out[0].float()


def encoding_of(pipe: Pipeline) -> str:
    """How the pipeline turns prompts into denoiser inputs: "clip" (one encoder's last hidden state), "sdxl"
    (text_embeds + time_ids), "sd3" (pooled_projections from several CLIPs, T5 tokens after them), "pixart"
    (one T5 encoder's last hidden state and its attention mask, which the denoiser also takes) or "flux" (the T5's
    states, the CLIP's pooled output)."""
    from edgediff.pipelines.components import masked_t5

    if masked_t5(pipe.denoiser.arch, {"components": pipe.components}):
        return "pixart"
    if pipe.denoiser.arch == "FluxTransformer2DModel":
        return "flux"
    names = {s.name for s in pipe.denoiser.signature.extra}
    if "pooled_projections" in names and len(pipe.names("text_encoder")) > 1:
        return "sd3"
    if {"text_embeds", "time_ids"} <= names:
        return "sdxl"
    return "clip"


def encode_conditioning(pipe: Pipeline, prompts: list[str], negative: list[str] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(conditional, unconditional) denoiser inputs by name for prompts, as the pipeline's own encode_prompt.

    One text encoder: encoder_hidden_states (guided_conditioning). SDXL (a denoiser taking text_embeds and
    time_ids): every CLIP's penultimate hidden states side by side, the last encoder's pooled projection as
    text_embeds, time_ids (H, W, 0, 0, H, W) at the pipeline's image size; the unconditional branch zeros when no
    negative prompt is given and the pipeline forces zeros for empty prompts (diffusers' default), else encoded."""
    kind = encoding_of(pipe)
    if kind == "sd3":
        return _sd3_conditioning(pipe, prompts, negative)
    if kind == "pixart":
        return _pixart_conditioning(pipe, prompts, negative)
    if kind == "flux":
        return _flux_conditioning(pipe, prompts, negative)
    if kind == "clip":
        c, u = guided_conditioning(pipe, prompts, negative)
        return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
    encoders = pipe.names("text_encoder")

    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        outs = [_clip(pipe, name, texts) for name in encoders]
        return {"encoder_hidden_states": torch.cat([h for h, _ in outs], -1), "text_embeds": outs[-1][1]}

    cond = enc(list(prompts))
    from edgediff.files import read_json

    zeros = negative is None and read_json(pipe.path / "model_index.json").get("force_zeros_for_empty_prompt", True)
    if zeros:
        uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    else:
        neg = negative if negative is not None else [""] * len(prompts)
        if len(neg) != len(prompts):
            raise BadInput(f"{len(neg)} negative prompts for {len(prompts)} prompts")
        uncond = enc(list(neg))
    c, h, w = (int(v) for v in pipe.denoiser.signature.sample_shape[-3:])
    f = pipe.vae_scale_factor() if pipe.has("vae") else 8
    ids = torch.tensor([h * f, w * f, 0, 0, h * f, w * f], dtype=torch.float32).expand(len(prompts), 6).clone()
    cond["time_ids"], uncond["time_ids"] = ids, ids.clone()
    return cond, uncond


def _sd3_conditioning(pipe: Pipeline, prompts: list[str], negative: list[str] | None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states side by side, zero-padded to the
    joint width, then T5's last hidden state (zeros when text_encoder_3 is absent, as diffusers); pooled_projections
    the two pooled projections side by side; the negative prompt ("" by default) encoded the same way."""
    from edgediff.pipelines.components import max_sequence_length

    width = int(pipe.denoiser.signature.cond_shape[-1]) if pipe.denoiser.signature.cond_shape else 4096
    clips = [n for n in pipe.names("text_encoder") if not is_t5(pipe, n)][:2]
    t5s = [n for n in pipe.names("text_encoder") if is_t5(pipe, n)]

    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        outs = [_clip(pipe, name, texts) for name in clips]
        clip = torch.cat([h for h, _ in outs], -1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if t5s:
            t5 = encoder_states(pipe, t5s[0], encoder_inputs(pipe, t5s[0], texts))
        else:
            t5 = torch.zeros(len(texts), max_sequence_length(pipe.class_name), width)
        return {"encoder_hidden_states": torch.cat([clip, t5], -2),
                "pooled_projections": torch.cat([p for _, p in outs], -1)}

    neg = negative if negative is not None else [""] * len(prompts)
    if len(neg) != len(prompts):
        raise BadInput(f"{len(neg)} negative prompts for {len(prompts)} prompts")
    return enc(list(prompts)), enc(list(neg))


def _pixart_conditioning(pipe: Pipeline, prompts: list[str], negative: list[str] | None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PixArtAlphaPipeline/PixArtSigmaPipeline.encode_prompt (clean_caption off): the T5's last hidden state with
    the attention mask fed to it, the mask (float) as the denoiser's encoder_attention_mask; the negative prompt
    ("" by default) encoded the same way."""
    neg = negative if negative is not None else [""] * len(prompts)
    if len(neg) != len(prompts):
        raise BadInput(f"{len(neg)} negative prompts for {len(prompts)} prompts")

    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        inputs = encoder_inputs(pipe, "text_encoder", texts)
        return {"encoder_hidden_states": encoder_states(pipe, "text_encoder", inputs),
                "encoder_attention_mask": inputs["attention_mask"].float()}

    return enc(list(prompts)), enc(list(neg))


def _flux_conditioning(pipe: Pipeline, prompts: list[str], negative: list[str] | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """FluxPipeline.encode_prompt: the CLIP's pooler_output as pooled_projections, the T5's last hidden state as
    encoder_hidden_states (txt_ids are zeros: the signature's fill); the negative prompt ("" by default) the same
    way, used only under true classifier-free guidance."""
    clip = next(n for n in pipe.names("text_encoder") if not is_t5(pipe, n))
    t5 = next(n for n in pipe.names("text_encoder") if is_t5(pipe, n))
    neg = negative if negative is not None else [""] * len(prompts)
    if len(neg) != len(prompts):
        raise BadInput(f"{len(neg)} negative prompts for {len(prompts)} prompts")

    @torch.no_grad()
    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        pooled = pipe.load(clip)(**encoder_inputs(pipe, clip, texts), output_hidden_states=False).pooler_output
        return {"encoder_hidden_states": encoder_states(pipe, t5, encoder_inputs(pipe, t5, texts)),
                "pooled_projections": pooled.float()}

    return enc(list(prompts)), enc(list(neg))


class GuidedDenoiser:
    """Classifier-free guidance around a sampler Denoiser: one batch [uncond; cond], then
    out = u + g (c - u), as diffusers pipelines step. `cond` passed by the sampler is the
    conditional encoder states of the rows; the unconditional rows come from `uncond` (same rows)."""

    def __init__(self, inner: Any, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> None:
        self.inner, self.uncond, self.cond, self.scale = inner, uncond, cond, float(scale)
        self.rows = 0  # where the next call's rows start (the sampler walks the batch in order)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        from edgediff.model import cond_cat, cond_take

        c = cond if isinstance(cond, (torch.Tensor, dict)) else cond_take(self.cond, slice(0, x.shape[0]))
        if isinstance(c, dict):  # named inputs (SDXL): rows matched on the encoder states
            assert isinstance(self.uncond, dict) and isinstance(self.cond, dict)
            u = {k: _match_rows(self.uncond[k], self.cond["encoder_hidden_states"], c["encoder_hidden_states"],
                                self.uncond["encoder_hidden_states"]) for k in c}
        else:
            u = _match_rows(self.uncond, self.cond, c)
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]), cond_cat([u, c]))
        ou, oc = out.chunk(2)
        return ou + self.scale * (oc - ou)


class ClassGuidedDenoiser:
    """DiT's classifier-free guidance: one batch [labels; null class], guided on the latent channels only
    (a learned-variance half passes through from the conditional rows), as diffusers' DiTPipeline steps."""

    def __init__(self, inner: Any, null_class: int, scale: float, channels: int) -> None:
        self.inner, self.null, self.scale, self.channels = inner, int(null_class), float(scale), int(channels)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        labels = torch.as_tensor(cond).long()
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, self.null)]))
        oc, ou = out.chunk(2)
        c = self.channels
        res = oc.clone()
        res[:, :c] = ou[:, :c] + self.scale * (oc[:, :c] - ou[:, :c])
        return res


def _match_rows(uncond: torch.Tensor, cond_all: torch.Tensor, c: torch.Tensor,
                key: torch.Tensor | None = None) -> torch.Tensor:
    # the unconditional states are identical per row for one negative prompt; otherwise find the rows
    # (`key`: the unconditional tensor whose sameness decides, when `uncond` is another input of the same rows)
    same = key if key is not None else uncond
    if same.shape[0] == 1 or bool((same == same[:1]).all()):
        return uncond[:1].expand(c.shape[0], *uncond.shape[1:])
    for i in range(cond_all.shape[0] - c.shape[0] + 1):
        if torch.equal(cond_all[i:i + c.shape[0]], c):
            return uncond[i:i + c.shape[0]]
    raise BadInput("guidance: cannot match the conditional rows to their negative prompts")


@torch.no_grad()
def pipeline_latents(pipe: Pipeline, model: Any, prompts: list[str], seed: int, sampler: str | None, steps: int,
                     guidance: float, negative: list[str] | None = None, progress: Any = None,
                     description: str = "pipeline") -> torch.Tensor:
    """Final latents of the PyTorch pipeline with `model` as its denoiser: one row per prompt, encoded by the
    pipeline's text encoder with classifier-free guidance (class pipelines: labels 0, 1, ... as the runtime's)."""
    from edgediff.pipelines.components import pipeline_sigmas
    from edgediff.sampling import SamplerConfig, TorchDenoiser, packed_grid, sample

    n = len(prompts)
    den: Any = TorchDenoiser(model)
    cond: Any = None
    sig = model.signature
    if not pipe.has("text_encoder") and sig.num_classes:
        cond = torch.arange(n) % int(sig.num_classes)
        if guidance > 1.0:
            den = ClassGuidedDenoiser(den, int(sig.num_classes), guidance, int(sig.sample_shape[0]))
    elif pipe.has("text_encoder"):
        cd, ud = encode_conditioning(pipe, prompts, negative)  # by input name (SDXL, SD3: pooled inputs too)
        c, u = (cd["encoder_hidden_states"], ud["encoder_hidden_states"]) if set(cd) == {"encoder_hidden_states"} \
            else (cd, ud)
        cond = c
        if guidance > 1.0:
            den = GuidedDenoiser(den, u, c, guidance)
    # as the pipeline class samples: its own sigma spacing, packed latents drawn unpacked (Flux)
    own = not sampler or sampler == model.schedule.class_name
    cfg = SamplerConfig(sampler, steps, sigmas=pipeline_sigmas(pipe.class_name) if own else None)
    x = sample(den, model.schedule, tuple(sig.sample_shape), n, seed, cfg, cond=cond, progress=progress,
               description=description, packed_grid=packed_grid(model))
    assert isinstance(x, torch.Tensor)
    return x


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """VAE decode as diffusers does: vae.decode(latents / scaling_factor + shift) -> images in [-1, 1]."""
    from edgediff.sampling import packed_grid, unpack_latents

    vae = pipe.load("vae")
    grid = packed_grid(pipe.denoiser)
    if latents.dim() == 3 and grid is not None:  # packed tokens (Flux) -> (N, C, H, W)
        latents = unpack_latents(latents, grid)
    z = latents.float() / pipe.vae_scaling_factor() + pipe.vae_shift_factor()
    return torch.cat([vae.decode(z[i:i + batch]).sample for i in range(0, len(z), batch)]).clamp(-1, 1)


def component_stats(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    """{name: {kind, class, params, macs (one call, batch 1), size_bytes}} for every component."""
    from edgediff import metrics

    out: dict[str, dict[str, Any]] = {}
    sig = pipe.denoiser.signature
    for name, comp in sorted(pipe.components.items()):
        row: dict[str, Any] = {"kind": comp["kind"], "class": comp["class"]}
        kind = comp["kind"]
        if kind == "denoiser":
            mod = pipe.denoiser.module()
            row.update({"params": metrics.params(mod), "macs": metrics.macs(pipe.denoiser),
                        "size_bytes": metrics.size_bytes(mod)})
            row["macs_note"] = "per denoiser call (x2 per step with guidance)"
        elif kind == "text_encoder":
            te = pipe.load(name)
            seq = text_sequence(pipe, name) if pipe.has("tokenizer") else (int(sig.cond_shape[0]) if sig.cond_shape
                                                                            else 77)
            ids = torch.zeros(1, seq, dtype=torch.long)
            row.update({"params": metrics.params(te), "macs": metrics.macs_of_call(te, ids),
                        "size_bytes": metrics.size_bytes(te), "sequence_length": seq})
        elif kind == "vae":
            vae = pipe.load(name)
            f = pipe.vae_scale_factor()
            c, h, w = (int(v) for v in sig.sample_shape[-3:])
            z = torch.zeros(1, c, h, w)
            img = torch.zeros(1, int(vae.config.in_channels), h * f, w * f)
            dec_params = metrics.params(vae.decoder) + metrics.params(vae.post_quant_conv or torch.nn.Identity())
            row.update({"params": metrics.params(vae), "size_bytes": metrics.size_bytes(vae),
                        "decoder_params": dec_params,
                        "macs_decode": metrics.macs_of_call(vae.decode, z),
                        "macs_encode": metrics.macs_of_call(vae.encode, img), "image_shape": [img.shape[1], h * f, w * f]})
        elif kind == "tokenizer":
            d = pipe.path / name
            row["size_bytes"] = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0
        elif kind == "scheduler":
            row["config"] = {k: v for k, v in pipe.scheduler_config().items() if k != "trained_betas"}
        else:
            row["bundled"] = False
        out[name] = row
    return out
