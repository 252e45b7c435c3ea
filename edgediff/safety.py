"""Checks that keep a file from someone else inside its folder and inside our budget.

- `plain_name` / `child_path`: names read from a manifest, structure.json, quant.json, a bundle
  JSON or an HLS project are plain names (or relative paths below their folder), never `..`,
  absolute, or a symlink that leads out.
- `check_output`: an output is never the input, inside it, or a folder holding it (whatever the
  flags), and never the current directory or one above it.
- temp names `.NAME.edgediff-tmp-PID-*` beside an output, and `clean_debris` that removes the
  ones a killed run left (its process is gone).
- a memory budget (default 8 GB, `--max-memory`, EDGEDIFF_MAX_MEMORY) that a model built from a
  config must fit, estimated before anything is allocated, and caps on sample/step counts.

docs/security.md describes the threat model.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput

TMP_MARK = ".edgediff-tmp-"
DEFAULT_MAX_MEMORY = 8 * 1000**3
MAX_SAMPLES = 4096
MAX_STEPS = 10_000
_BAD_CHARS = re.compile(r"[\x00-\x1f/\\]")


# ---------------------------------------------------------------- names and paths
def plain_name(name: object, where: str, what: str = "name") -> str:
    """A single path component: no separators, not `.`/`..`, not empty, printable."""
    if not isinstance(name, str) or not name or name in (".", "..") or _BAD_CHARS.search(name) or len(name) > 200:
        raise BadInput(f"{where}: {what} {name!r} is not a plain file name")
    return name


def child_path(folder: Path, rel: object, where: str, what: str = "path") -> Path:
    """`folder/rel` for a relative path that stays below `folder`, symlinks resolved."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel or len(rel) > 1000:
        raise BadInput(f"{where}: {what} {rel!r} is not a relative path")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise BadInput(f"{where}: {what} {rel!r} leaves its folder (absolute or with '..')")
    full = Path(folder) / p
    root = Path(folder).resolve()
    try:
        resolved = full.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise BadInput(f"{where}: {what} {rel!r} cannot be resolved (symlink loop?)") from None
    if resolved != root and root not in resolved.parents:
        raise BadInput(f"{where}: {what} {rel!r} is a symlink that leads out of {folder}")
    return full


def check_tree(folder: Path, where: str | None = None) -> None:
    """No symlink below `folder` points outside it (an artifact must be self-contained)."""
    root = Path(folder).resolve()
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                target = p.resolve()
                if target != root and root not in target.parents:
                    raise BadInput(f"{where or folder}: {p.relative_to(folder)} is a symlink that leads out of "
                                   f"{folder}")


def _inside(a: Path, b: Path) -> bool:
    """a == b or a is below b (both resolved)."""
    return a == b or b in a.parents


def check_output(output: Path, inputs: list[Path | str] = ()) -> None:  # type: ignore[assignment]
    """An output may not be an input, lie inside one, or contain one; nor be `.` or above it."""
    out = Path(output).absolute()
    out_r = Path(os.path.realpath(out))
    cwd = Path.cwd().resolve()
    if _inside(cwd, out_r) or str(output) in ("", ".", ".."):
        raise BadInput(f"{output}: output is the current directory or a folder above it; name a new path")
    for src in inputs:
        if src is None or str(src) == "demo":
            continue
        s = Path(os.path.realpath(Path(src).absolute()))
        if not s.exists():
            continue
        if _inside(out_r, s):
            raise BadInput(f"{output}: output is the input {src} or inside it; inputs are never modified "
                           "(choose another path)")
        if _inside(s, out_r):
            raise BadInput(f"{output}: output is a folder that holds the input {src}; replacing it would destroy "
                           "the input (choose another path)")


# ---------------------------------------------------------------- temp names and debris
def temp_prefix(dest: Path) -> str:
    """Prefix of temp files/dirs beside `dest`; carries our pid so a later run knows if we are gone."""
    return f".{Path(dest).name}{TMP_MARK}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_debris(dest: Path) -> list[Path]:
    """Remove `.NAME.edgediff-tmp-PID-*` beside `dest` whose process is gone; returns what went."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    prefix = f".{dest.name}{TMP_MARK}"
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------- resource budget
_budget = [DEFAULT_MAX_MEMORY]


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """'8G', '512M', '2.5GB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", str(text))
    if not m:
        raise BadInput(f"{flag} {text!r}: expected a size such as 8G, 512M or a number of bytes")
    value = float(m.group(1)) * 1000 ** " KMGT".index((m.group(2) or " ").upper())
    if value < 1:
        raise BadInput(f"{flag} {text!r}: must be positive")
    return int(value)


def set_max_memory(nbytes: int | None) -> None:
    _budget[0] = int(nbytes) if nbytes else DEFAULT_MAX_MEMORY


def max_memory() -> int:
    env = os.environ.get("EDGEDIFF_MAX_MEMORY")
    if env and _budget[0] == DEFAULT_MAX_MEMORY:
        return parse_size(env, "EDGEDIFF_MAX_MEMORY")
    return _budget[0]


def _gb(n: float) -> str:
    return f"{n / 1000**3:.1f} GB" if n >= 1e8 else f"{n / 1000**2:.1f} MB"


def check_budget(need: float, where: str, what: str) -> None:
    limit = max_memory()
    if need > limit:
        raise BadInput(f"{where}: {what} needs about {_gb(need)}, more than the {_gb(limit)} budget "
                       "(--max-memory to change it)")


def _num(v: Any, default: int) -> int:
    if isinstance(v, (list, tuple)):
        return max((_num(x, default) for x in v), default=default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return default
    return int(v) if abs(v) < 1e15 else 10**15


def estimate_activation_bytes(arch: str, cfg: dict[str, Any], sample_shape: tuple[int, ...] | None = None,
                              batch: int = 2) -> float:
    """Peak activation bytes of one denoiser call, from the config alone (an order-of-magnitude figure).

    The widest feature map at full resolution times the layers that keep one alive, plus the
    attention score matrix (tokens^2 per head) at the first resolution that has attention.
    """
    size = cfg.get("sample_size") if sample_shape is None else sample_shape[-1]
    if sample_shape is not None and len(sample_shape) >= 2:
        h, w = int(sample_shape[-2]), int(sample_shape[-1])
    else:
        h = w = _num(size, 32)
    width = _num(cfg.get("block_out_channels"), 0) or _num(cfg.get("num_attention_heads"), 8) * _num(
        cfg.get("attention_head_dim"), 64)
    blocks = cfg.get("down_block_types") or []
    n_layers = max(4, (_num(cfg.get("layers_per_block"), 2) + 1) * max(len(blocks), 1) * 4
                   + _num(cfg.get("num_layers"), 0) * 4)
    feat = float(batch) * width * h * w * 4 * n_layers
    tokens = float(h) * w
    if "Transformer" in arch or "DiT" in arch:
        p = max(_num(cfg.get("patch_size"), 2), 1)
        tokens = float(h // p) * (w // p)
    else:
        first = next((i for i, t in enumerate(blocks) if "Attn" in str(t)), None)
        tokens = tokens / (4 ** first) if first is not None else tokens / (4 ** max(len(blocks) - 1, 0))
    heads = max(_num(cfg.get("num_attention_heads"), 0), width // max(_num(cfg.get("attention_head_dim"), 8), 1), 1)
    attn = float(batch) * heads * tokens * tokens * 4
    return feat + attn


def check_config_budget(arch: str, cfg: dict[str, Any], where: str,
                        sample_shape: tuple[int, ...] | None = None) -> None:
    """Refuse a config whose model would not fit the budget: parameters counted on the meta device
    (nothing allocated), activations estimated at the sample shape."""
    size = cfg.get("sample_size")
    for v in (size if isinstance(size, (list, tuple)) else [size]):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v <= 0):
            raise BadInput(f"{where}: sample_size {size!r} must be a positive integer")
    act = estimate_activation_bytes(arch, cfg, sample_shape)
    check_budget(act, where, f"one denoiser call of this {arch} at {sample_shape or size}")


def check_params_budget(n_params: int, where: str) -> None:
    check_budget(float(n_params) * 4 * 2, where, f"a model of {n_params:,} parameters (weights and a working copy)")


def check_count(value: int, flag: str, cap: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"{flag} {value!r}: must be a positive integer")
    if value > cap:
        raise BadInput(f"{flag} {value}: at most {cap}")
    return value


def check_build_budget(cls: Any, arch: str, cfg: dict[str, Any], where: Path | str) -> None:
    """Before building `cls.from_config(cfg)`: activations estimated from the config, parameters
    counted on the meta device (no memory allocated); BadInput when either exceeds the budget."""
    import torch

    check_config_budget(arch, cfg, str(where))
    try:
        with torch.device("meta"):
            meta = cls.from_config(cfg)
    except Exception:  # noqa: BLE001 - the real build reports a bad config with its own message
        return
    check_params_budget(sum(p.numel() for p in meta.parameters()), str(where))


_warned_cache: list[Path] = []


def cache_dir() -> Path:
    """Where passes cache data: EDGEDIFF_CACHE_DIR, else ~/.cache/edgediff; when that cannot be
    written (a read-only HOME) a per-user temp folder, said once on stderr."""
    import sys
    import tempfile

    env = os.environ.get("EDGEDIFF_CACHE_DIR")
    preferred = Path(env) if env else Path.home() / ".cache" / "edgediff"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK | os.X_OK):
            return preferred
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"edgediff-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(parents=True, exist_ok=True)
    if fallback not in _warned_cache:
        _warned_cache.append(fallback)
        sys.stderr.write(f"edgediff: warning: cannot write the cache {preferred}; using {fallback} for this run\n")
    return fallback


def warn_nonfinite(state: dict[str, Any], where: Path | str) -> int:
    """One warning line when weights hold NaN/Inf (the model will produce NaN); returns how many tensors."""
    import sys

    import torch

    bad = [k for k, t in state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        sys.stderr.write(f"edgediff: warning: {where}: {len(bad)} weight tensor(s) hold NaN or Inf "
                         f"(e.g. {bad[0]}); outputs will not be finite\n")
    return len(bad)
