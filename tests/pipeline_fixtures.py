"""Tiny random-weight diffusers pipelines written with save_pretrained, shared by the pipeline tests.

`build_tiny_sd(folder)`: an SD-1.x-style StableDiffusionPipeline (CLIPTextModel 2 layers x 32, a
byte-level CLIP BPE tokenizer whose vocab.json/merges.txt the test writes, AutoencoderKL with a
2x down-scale, UNet2DConditionModel on 4x8x8 latents, the SD-1.x PNDM scheduler config), 16-token
prompts. Import the fixtures into a test module: `from pipeline_fixtures import tiny_sd  # noqa: F401`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

SEQ = 16
MERGES = [("a", "t</w>"), ("t", "h"), ("th", "e</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"),
          ("r", "e"), ("e", "d</w>"), ("re", "d</w>")]


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: Path, seq: int = SEQ) -> dict[str, int]:
    """vocab.json + merges.txt of a small CLIP BPE (every byte, with and without </w>, a few merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    chars = _bytes_to_unicode()
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    return vocab


def tiny_vae(**overrides: float) -> object:
    """The tests' AutoencoderKL: 8/16 channels, 4 latent channels, a 2x down-scale, 16x16 images."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         latent_channels=4, norm_num_groups=4, sample_size=16, layers_per_block=1, **overrides)


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder.parent / f"{folder.name}-vocab"
    vocab = write_clip_tokenizer(tok_dir)
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=SEQ)
    torch.manual_seed(seed)
    eos = vocab["<|endoftext|>"]
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=SEQ,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                cross_attention_dim=32, attention_head_dim=8)
    vae = tiny_vae()
    sch = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                        steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_ddpm(folder: Path, seed: int = 0) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))
    return Path(folder)


def _save_tiny_sd3(folder: Path | str, joint_dim: int, pooled_dim: int, **encoders: Any) -> None:
    """A one-layer SD3Transformer2DModel on 4x8x8 latents, the shifted VAE, FlowMatchEuler (shift 3), saved
    as a StableDiffusion3Pipeline with the given CLIP encoders/tokenizers (none by default; no T5)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tr = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16,
                                         pooled_projection_dim=pooled_dim, out_channels=4, pos_embed_max_size=16)
    parts = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
             "text_encoder_3": None, "tokenizer_3": None, **encoders}
    StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=tiny_vae(shift_factor=0.06, scaling_factor=1.5), **parts).save_pretrained(str(folder))


def build_tiny_dit(folder: Path, seed: int = 0) -> Path:
    """A DiTPipeline (class-conditional DiT on 4x8x8 latents, 1000 classes as DiT's null class 1000 needs, the
    tiny AutoencoderKL, DDIM) with an id2label in model_index.json as the hub's DiT pipelines have."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8)
    vae = tiny_vae()
    DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler()).save_pretrained(str(folder))
    idx = json.loads((Path(folder) / "model_index.json").read_text())
    idx["id2label"] = {str(i): f"class{i}" for i in range(1000)}
    idx["id2label"]["1"] = "cat, kitty"
    (Path(folder) / "model_index.json").write_text(json.dumps(idx))
    return Path(folder)


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline without its text encoders (conditioning comes as precomputed embeddings):
    SD3Transformer2DModel on 4x8x8 latents (joint dim 24, pooled 12), AutoencoderKL with a shift factor,
    FlowMatchEuler."""
    torch.manual_seed(seed)
    _save_tiny_sd3(folder, joint_dim=24, pooled_dim=12)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.x pipeline folder (built once per test session; tests must not modify it)."""
    return build_tiny_sd(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ddpm(tmp_path_factory.mktemp("pipelines") / "tiny-ddpm")


@pytest.fixture(scope="session")
def tiny_dit_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dit(tmp_path_factory.mktemp("pipelines") / "tiny-dit")


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    """Run the CLI in-process with --json: (exit code, its JSON object or {})."""
    from edgediff.cli import main

    capsys.readouterr()
    rc = main([*args, "--json"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else {})


def _clip_setup(folder: Path, seed: int, **sizes: int) -> tuple[object, dict]:
    """(tokenizer on the test's CLIP vocabulary, written beside `folder`; a 2-layer CLIPTextConfig's kwargs), seeded."""
    from transformers import CLIPTokenizer

    tok_dir = folder.parent / f"{folder.name}-vocab"
    vocab = write_clip_tokenizer(tok_dir)
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=SEQ)
    torch.manual_seed(seed)
    eos = vocab["<|endoftext|>"]
    return tok, dict(vocab_size=len(vocab), num_hidden_layers=2, max_position_embeddings=SEQ,
                     bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos, **sizes)


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """An SDXL-style StableDiffusionXLPipeline: CLIPTextModel + CLIPTextModelWithProjection (32 wide each, the
    denoiser's cross-attention 64 = their concatenation), two tokenizers on the test's CLIP vocabulary,
    UNet2DConditionModel with text_time added conditioning (pooled 32 + 6 time ids x 8), the tiny VAE, Euler."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    tok, cfg = _clip_setup(folder, seed, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    te = CLIPTextModel(CLIPTextConfig(**cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=32))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                cross_attention_dim=64, attention_head_dim=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = tiny_vae(scaling_factor=0.13025)
    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                 timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                              scheduler=sch).save_pretrained(str(folder))
    return folder


def build_tiny_sd3_clip(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline with its two CLIPTextModelWithProjection encoders (16 wide, projections 16) and
    no T5 (text_encoder_3 absent, as diffusers allows: its states are zeros), SD3Transformer2DModel with joint
    width 48 and pooled width 32, the tiny VAE with a shift factor, FlowMatchEuler."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    tok, cfg = _clip_setup(folder, seed, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
    te, te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    _save_tiny_sd3(folder, joint_dim=48, pooled_dim=32, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                   tokenizer_2=tok)
    return folder


T5_WORDS = ("a", "red", "cat", "the", "dog", "blue", "on", "photo", "of", "an", "in")


def t5_tokenizer(model_max_length: int = 512) -> object:
    """A T5TokenizerFast on a small Unigram vocabulary the test writes (<pad> 0, </s> 1, <unk> 2, whole words and
    single letters after the Metaspace prefix, </s> appended as T5's post-processor does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=model_max_length)


def tiny_t5(d_model: int) -> object:
    """A 2-layer random T5EncoderModel on t5_tokenizer's vocabulary."""
    from transformers import T5Config, T5EncoderModel

    n = len(t5_tokenizer().get_vocab())
    return T5EncoderModel(T5Config(vocab_size=n, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def build_tiny_sd3_t5(folder: Path, seed: int = 0) -> Path:
    """build_tiny_sd3_clip's two CLIPs plus a T5EncoderModel (48 wide: the joint width) as text_encoder_3."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    tok, cfg = _clip_setup(folder, seed, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
    te, te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    _save_tiny_sd3(folder, joint_dim=48, pooled_dim=32, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                   tokenizer_2=tok, text_encoder_3=tiny_t5(48), tokenizer_3=t5_tokenizer())
    return folder


def build_tiny_pixart(folder: Path, seed: int = 0) -> Path:
    """A PixArtAlphaPipeline: a T5EncoderModel (32 wide), PixArtTransformer2DModel on 4x8x8 latents with learned
    variance and no resolution conditioning, the tiny VAE, DPM-Solver++ (PixArt-alpha's scheduler)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32,
                                  norm_num_groups=8, use_additional_conditions=False)
    PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(32), vae=tiny_vae(), transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(str(folder))
    return Path(folder)


def build_tiny_flux(folder: Path, seed: int = 0) -> Path:
    """A FluxPipeline: CLIPTextModel (16 wide, pooled 16) + a T5EncoderModel (32 wide) as text_encoder_2, a
    one-block FluxTransformer2DModel with the guidance embedding (Flux-dev style), the tiny VAE, FlowMatchEuler
    with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tok, cfg = _clip_setup(folder, seed, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    FluxPipeline(scheduler=sch, vae=tiny_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)), tokenizer=tok,
                 text_encoder_2=tiny_t5(32), tokenizer_2=t5_tokenizer(), transformer=tr).save_pretrained(str(folder))
    return folder
