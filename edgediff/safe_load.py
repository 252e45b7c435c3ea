"""Read a `torch.export` archive (.pt2) without running anything from the file.

`torch.export.load` is not safe on a file from someone else: it unpickles the archive's
sample inputs (falling back to full pickle when weights-only fails), pickled weights and
constants, evaluates symbolic-shape strings with `sympy.sympify` (an `eval`), execs the
archive's guard code when the module is built, and resolves operator names by walking
attributes of the `torch` module (`torch.os.system` resolves). So without --trust-pickle we:

- never read the sample inputs; refuse pickled weights/constants, custom and opaque objects
  and the legacy (pre-2.8) layout;
- drop node metadata (stack traces, module stacks) and the guard code, then check every
  remaining string of the program JSON: operator names against a closed grammar
  (`torch.ops.aten|prims|higher_order.NAME.OVERLOAD`, a few `_operator`/`math`/`torch.sym_*`
  functions), shape expressions against a token allowlist, everything else against a plain
  name pattern (no quotes, brackets, spaces or operators, so nothing that code generation
  could turn into code);
- hand the cleaned program and the raw weight bytes to torch's deserializer.

Anything unrecognised is refused with a message pointing at --trust-pickle.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput

_PLAIN = re.compile(r"[A-Za-z0-9_.:\-]{0,400}\Z")
_VERSION = re.compile(r"[A-Za-z0-9_.+\-]{0,64}\Z")
_ATEN = re.compile(r"torch\.ops\.(aten|prims|higher_order)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?\Z")
_OPERATOR_FUNCS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt",
                   "le", "gt", "ge", "and_", "or_", "not_", "abs"}
_MATH_FUNCS = {"ceil", "floor", "sqrt", "trunc", "exp", "log", "pi"}
_TORCH_SYM = re.compile(r"torch\.(sym_(float|int|max|min|not|ite|sum|sqrt)|_sym_sqrt)\Z")
# names sympify may see: sympy constructors of the srepr form and torch's symbolic functions
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "positive", "integer", "real", "finite", "nonnegative", "True", "False",
    "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "zoo", "nan", "floor",
    "ceiling", "sqrt", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "Identity",
}
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[a-z]{1,8}[0-9]{0,9}')|"
                         r"(?P<num>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)|(?P<op>\*\*|//|[-+*/%(),=<>!&|~]))")
# a symbol name as torch writes them (s0, u3, zf12...)
_SYMBOL = re.compile(r"[a-z]{1,8}[0-9]{0,9}\Z")
_DROPPED = ("stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom", "from_node")
MAX_ENTRIES = 100_000


def _refuse(path: Path, why: str) -> BadInput:
    return BadInput(f"{path}: {why}; edgediff only reads plain torch.export archives without running code from "
                    "them (rerun with --trust-pickle if you trust its source)")


def _check_expr(expr: str, path: Path) -> None:
    if len(expr) > 4000:
        raise _refuse(path, "a shape expression is too long")
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            if expr[pos:].strip() == "":
                return
            raise _refuse(path, f"shape expression {expr[:60]!r} has characters outside the allowed grammar")
        name = m.group("name")
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL.match(name):
            raise _refuse(path, f"shape expression {expr[:60]!r} names {name!r}")
        pos = m.end()


def _check_operator(target: Any, path: Path) -> None:
    if not isinstance(target, str):
        raise _refuse(path, f"operator {target!r} is not a string")
    if _ATEN.match(target) or _TORCH_SYM.match(target):
        return
    mod, _, fn = target.partition(".")
    if (mod == "_operator" and fn in _OPERATOR_FUNCS) or (mod == "math" and fn in _MATH_FUNCS):
        return
    raise _refuse(path, f"graph calls {target[:80]!r}, which is not a known operator")


def _check_string(s: str, key: str, path: Path, depth: int = 0) -> None:
    if _PLAIN.match(s):
        return
    if key == "torch_version" and _VERSION.match(s):
        return
    if depth < 4 and s[:1] in "[{":
        # pytree specs are JSON inside a string; their type names are looked up in a registry
        try:
            inner = json.loads(s)
        except ValueError:
            inner = None
        if isinstance(inner, (dict, list)):
            _walk(inner, path, depth + 1)
            return
    raise _refuse(path, f"program field {key!r} holds {s[:60]!r}, not a plain name")


def _walk(obj: Any, path: Path, depth: int = 0, key: str = "") -> Any:
    """Check every string; return a copy without the metadata we never need."""
    if isinstance(obj, dict):
        if "inputs" in obj and "outputs" in obj and "target" in obj:  # a graph node
            _check_operator(obj["target"], path)
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise _refuse(path, "program JSON has a non-string key")
            if k in _DROPPED:
                continue
            if k == "guards_code":
                out[k] = []  # Python source, exec'd when the module is built: never used
                continue
            if k == "expr_str":
                if not isinstance(v, str):
                    raise _refuse(path, "a shape expression is not a string")
                _check_expr(v, path)
                out[k] = v
                continue
            if k == "as_operator":
                _check_operator(v, path)
            if k == "range_constraints" and isinstance(v, dict):
                for sym in v:
                    _check_expr(sym, path)
            elif not _PLAIN.match(k):
                _check_string(k, "key", path, depth)
            out[k] = _walk(v, path, depth, k)
        return out
    if isinstance(obj, list):
        return [_walk(x, path, depth, key) for x in obj]
    if isinstance(obj, str):
        _check_string(obj, key, path, depth)
        return obj
    return obj


def _payload_configs(names: set[str], read: Any, model: str, path: Path) -> None:
    """Refuse pickled or custom-object payloads before torch sees them."""
    for kind in ("weights", "constants"):
        if f"data/{kind}/{model}.pt" in names:
            raise _refuse(path, f"archive uses the legacy pickled {kind} layout")
        cfg_name = f"data/{kind}/{model}_{kind}_config.json"
        if cfg_name not in names:
            raise _refuse(path, f"archive has no {cfg_name}")
        try:
            cfg = json.loads(read(cfg_name))
        except (ValueError, UnicodeDecodeError):
            raise BadInput(f"{path}: {cfg_name} is not valid JSON") from None
        entries = cfg.get("config") if isinstance(cfg, dict) else None
        if not isinstance(entries, dict):
            raise BadInput(f"{path}: {cfg_name} has no 'config' object")
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                raise _refuse(path, f"{kind} entry {str(fqn)[:60]!r} is pickled")
            pname = meta.get("path_name")
            if not isinstance(pname, str) or not re.fullmatch(r"(weight|tensor_constant)_[0-9]+", pname):
                raise _refuse(path, f"{kind} entry {str(fqn)[:60]!r} is not a plain tensor ({pname!r})")
            _walk(meta, path)


def _exported_program_safely(path: Path) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict

    try:
        with zipfile.ZipFile(path) as z:
            raw = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BadInput(f"{path}: not a torch.export archive ({e})") from None
    if len(raw) > MAX_ENTRIES:
        raise BadInput(f"{path}: archive has {len(raw)} entries (more than {MAX_ENTRIES})")
    with PT2ArchiveReader(str(path)) as reader:
        names = set(reader.get_file_names())
        models = sorted(n[len("models/"):-len(".json")] for n in names
                        if n.startswith("models/") and n.endswith(".json"))
        if "model" not in models:
            if "serialized_exported_program.json" in {r.rpartition("/")[2] for r in raw}:
                raise _refuse(path, "archive uses the legacy (torch < 2.8) format, whose weights are pickled")
            raise BadInput(f"{path}: not a torch.export archive (no models/model.json)")

        def read(name: str) -> str:
            return reader.read_string(name)

        _payload_configs(names, read, "model", path)
        try:
            program = json.loads(read("models/model.json"))
        except (ValueError, UnicodeDecodeError):
            raise BadInput(f"{path}: models/model.json is not valid JSON") from None
        if not isinstance(program, dict):
            raise BadInput(f"{path}: models/model.json is not a JSON object")
        program = _walk(program, path)
        serialized = _dict_to_dataclass(schema.ExportedProgram, program)
        state_dict = _load_state_dict(reader, "model")
        constants = _load_constants(reader, "model")
        # b"": the sample inputs are never read (they are a pickle)
        return ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, b"")


class ExportedDenoiser(nn.Module):
    """An ExportedProgram's module that tolerates .eval()/.train() (the unlifted module raises)."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()
        self.input_names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        # an archive exported without a dynamic batch runs one sample at a time
        self.fixed_batch: int | None = None
        for node in program.graph.nodes:
            if node.op == "placeholder" and self.input_names and node.name == self.input_names[0]:
                val = node.meta.get("val")
                if val is not None and len(val.shape) and isinstance(val.shape[0], int):
                    self.fixed_batch = int(val.shape[0])

    def train(self, mode: bool = True) -> ExportedDenoiser:  # noqa: FBT001 - nn.Module's signature
        self.training = mode  # the graph was exported in eval mode; nothing to switch below us
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs and set(kwargs) <= set(self.input_names[len(args):]):
            # the unlifted module of a positionally exported program refuses keywords: place them by name
            vals = {**dict(zip(self.input_names, args)), **kwargs}
            if all(n in vals for n in self.input_names):
                args, kwargs = tuple(vals[n] for n in self.input_names), {}
        n = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else None
        if self.fixed_batch is None or n is None or n == self.fixed_batch:
            return self.program(*args, **kwargs)
        if self.fixed_batch != 1:
            raise BadInput(f"this torch.export archive was exported for a batch of exactly {self.fixed_batch}; "
                           f"re-export it with a dynamic batch (torch.export.Dim) to call it with {n}")

        def part(a: Any, i: int) -> Any:
            return a[i:i + 1] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a

        outs = [self.program(*(part(a, i) for a in args), **{k: part(v, i) for k, v in kwargs.items()})
                for i in range(n)]
        return torch.cat(outs) if isinstance(outs[0], torch.Tensor) else outs


def load_exported_program(path: Path, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """The archive's ExportedProgram; without `trust_pickle` nothing from the file is run."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path}: not a torch.export archive (not a zip file; truncated or wrong kind)")
    try:
        if trust_pickle:
            return torch.export.load(str(path))
        return _exported_program_safely(path)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - torch's deserializer raises many kinds on a damaged archive
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadInput(f"{path}: cannot load torch.export archive ({e.__class__.__name__}: {first})") from None
