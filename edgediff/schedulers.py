"""Which diffusers schedulers edgediff drives, by short name or class name, and how to build one.

The scheduler itself is always diffusers' own object (set_timesteps / scale_model_input /
step / init_noise_sigma): edgediff never re-implements a sampler on the PyTorch side. This
module only resolves names, classifies a scheduler into the family of its forward process
(which decides how training noise and calibration inputs are drawn) and turns diffusers'
errors on a bad config into one-line BadInput messages.

Families:
  discrete  DDPM-type forward process on alphas_cumprod (DDPM, DDIM, PNDM, Euler, Heun,
            DPM-Solver, UniPC, LCM ...); predictions epsilon / v_prediction / sample.
  flow      rectified flow x_t = (1 - s) x0 + s noise (FlowMatch*); the model predicts the
            velocity noise - x0 ("flow_prediction").
  edm       sigma-parameterised x = x0 + s noise with Karras' c_in/c_skip/c_out
            preconditioning (EDM*); predictions epsilon / v_prediction.
"""

from __future__ import annotations

import inspect
from typing import Any

from edgediff.errors import BadInput

# --sampler short names -> (diffusers class, config overrides)
SHORT_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "edm-euler": ("EDMEulerScheduler", {}),
}
# the ones tested equal to a plain diffusers loop (tests/test_schedulers.py)
TESTED = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
          "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
          "UniPCMultistepScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler")
DEFAULT_CLASS = "DDPMScheduler"
PREDICTIONS = {"discrete": ("epsilon", "v_prediction", "sample"), "flow": ("flow_prediction",),
               "edm": ("epsilon", "v_prediction")}
# diffusers scheduler classes that are not samplers of a denoiser edgediff can drive
_NOT_SAMPLERS = ("SchedulerMixin", "KarrasDiffusionSchedulers", "AmusedScheduler", "CMStochasticIterativeScheduler",
                 "DDPMWuerstchenScheduler", "IPNDMScheduler", "KarrasVeScheduler", "RePaintScheduler",
                 "ScoreSdeVeScheduler", "ScoreSdeVpScheduler", "VQDiffusionScheduler", "UnCLIPScheduler")


def family_of(class_name: str) -> str:
    """discrete / flow / edm for a diffusers scheduler class name."""
    if class_name.startswith("FlowMatch"):
        return "flow"
    if class_name.startswith("EDM") or class_name == "CosineDPMSolverMultistepScheduler":
        return "edm"
    return "discrete"


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class for a diffusers class name; BadInput if there is none."""
    import diffusers

    if name in _NOT_SAMPLERS or not name.endswith("Scheduler"):
        raise BadInput(f"unknown scheduler {name!r}; expected a short name ({', '.join(SHORT_NAMES)}) "
                       "or a diffusers scheduler class name such as EulerDiscreteScheduler")
    try:
        cls = getattr(diffusers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if cls is None or not inspect.isclass(cls) or not hasattr(cls, "step"):
        raise BadInput(f"unknown scheduler {name!r}; not a scheduler class of diffusers {diffusers.__version__} "
                       f"(short names: {', '.join(SHORT_NAMES)})")
    return cls


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """A --sampler value -> (diffusers class name, config overrides); BadInput if unknown."""
    key = name.strip()
    if key.lower() in SHORT_NAMES:
        return SHORT_NAMES[key.lower()]
    scheduler_class(key)
    return key, {}


def supported() -> list[dict[str, Any]]:
    """The table `edgediff info` / `recipes` print: short name, class, family, tested."""
    rows = [{"name": k, "class": c, "family": family_of(c), "overrides": o, "tested": c in TESTED}
            for k, (c, o) in SHORT_NAMES.items()]
    return rows


def build(class_name: str, config: dict[str, Any], where: str = "scheduler config") -> Any:
    """A fresh diffusers scheduler object of `class_name` from `config` (extra keys ignored)."""
    cls = scheduler_class(class_name)
    own = {k: v for k, v in config.items() if not k.startswith("_")}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in own.items() if k in accepted}
    try:
        return cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises NotImplementedError/ValueError/... on bad values
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise BadInput(f"{where}: cannot build {class_name} ({e.__class__.__name__}: {msg})") from None


def step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """The optional keyword arguments of scheduler.step() that this scheduler accepts."""
    params = inspect.signature(scheduler.step).parameters
    kw: dict[str, Any] = {}
    if "generator" in params:
        kw["generator"] = generator
    if "eta" in params:
        kw["eta"] = eta
    return kw
