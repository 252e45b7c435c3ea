"""Prompts for calibration and verification of text-conditioned pipelines.

A built-in list of 64 varied prompts (subjects, styles, scenes, lighting, short and long) so that
calibration sees the range of text conditioning a deployed model meets; `--prompts FILE` (one
prompt a line, `#` comments and blank lines skipped) replaces it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgediff.errors import BadInput

PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse",
    "a red fox sitting in fresh snow, golden hour",
    "a bowl of ramen on a wooden table, top view",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a watercolor painting of a lighthouse on a cliff",
    "a futuristic city skyline at night with neon signs",
    "a cozy reading nook with a cat asleep on a blanket",
    "an oil painting of sunflowers in a blue vase",
    "a steam locomotive crossing a stone bridge in the mountains",
    "macro photo of a dew drop on a green leaf",
    "a medieval castle surrounded by fog at dawn",
    "a pixel art spaceship flying over a purple planet",
    "a child flying a kite on a windy beach",
    "isometric illustration of a tiny island with a windmill",
    "a plate of pancakes with blueberries and maple syrup",
    "a black and white photo of a busy street in 1950s paris",
    "a corgi wearing sunglasses on a skateboard",
    "an ancient library with tall shelves and floating candles",
    "a snowy mountain lake reflecting the stars",
    "a bright yellow sports car on a desert highway",
    "a hummingbird drinking from a red flower, high speed photo",
    "a minimalist poster of a mountain range, flat colors",
    "a bustling night market in taipei, street food stalls",
    "a wooden sailboat on a calm sea under a pink sky",
    "a detailed pencil sketch of a human hand",
    "a robot gardener watering tomato plants",
    "a frog playing a tiny violin on a lily pad",
    "an aerial view of rice terraces in the morning mist",
    "a glass of orange juice with ice cubes, studio lighting",
    "the interior of a gothic cathedral with stained glass",
    "a stack of old books and a cup of coffee",
    "a tiger walking through a bamboo forest",
    "a cyberpunk samurai standing in the rain",
    "a field of lavender under a summer sky",
    "a vintage camera on a marble table",
    "a colorful hot air balloon festival at sunrise",
    "a polar bear swimming under arctic ice",
    "a cottage with a thatched roof and a flower garden",
    "a close-up of a mechanical watch movement",
    "a desert caravan of camels at sunset",
    "a bowl of fresh fruit, still life in the style of cezanne",
    "an underwater coral reef with tropical fish",
    "a rainy window with city lights blurred behind it",
    "a knight in shining armor holding a banner",
    "a chalk drawing of a rocket on a blackboard",
    "a treehouse in a giant oak tree, fantasy art",
    "two people dancing tango in a dim ballroom",
    "a jar of honey with a wooden dipper, soft light",
    "a volcano erupting at night, lava flows",
    "a paper origami crane on a white background",
    "a subway station during rush hour, motion blur",
    "a golden retriever puppy playing in autumn leaves",
    "a japanese garden with a red bridge and koi pond",
    "a chef tossing vegetables in a flaming wok",
    "an abstract painting of swirling blue and gold shapes",
    "a lonely bench in a park covered in snow",
    "a bicycle leaning against a brick wall",
    "a majestic eagle soaring over a canyon",
    "a neon sign that says open in a dark alley",
    "a loaf of sourdough bread cut in half",
    "a spiral galaxy seen through a telescope",
    "a cat",
    "a mountain",
    "",
)


def read_prompts(path: Path | str) -> list[str]:
    """Prompts from a text file: one a line, blank lines and `#` comments skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot read the prompts ({e.__class__.__name__})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BadInput(f"{path}: no prompts in the file (one prompt a line)")
    return prompts


def prompts_for(n: int, prompts: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """n prompts, cycling through the list (built-in when None)."""
    src = list(prompts if prompts is not None else PROMPTS)
    return [src[i % len(src)] for i in range(n)]


def use_prompts(model: Any, path: Path | str) -> list[str]:
    """`--prompts FILE`: the prompts a text pipeline's passes and verify use instead of the built-in list
    (kept in extras["pipeline"], so an artifact carries them)."""
    rec = getattr(model, "extras", {}).get("pipeline")
    if not isinstance(rec, dict) or "text_encoder" not in (rec.get("components") or {}):
        raise BadInput(f"{path}: --prompts needs a text-to-image pipeline (a folder with model_index.json and a "
                       "text encoder, or an artifact made from one)")
    prompts = read_prompts(path)
    rec["prompts"] = prompts
    return prompts
