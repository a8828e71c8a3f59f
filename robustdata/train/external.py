"""Audit with the user's own classifier: load it from a TorchScript archive or from a factory + state_dict.

Two ways, chosen by the spec's prefix:

    torchscript:PATH                     torch.jit.load(PATH); a scripted or traced module
    factory:MODULE:ATTR[?K=V&K=V...]     MODULE.ATTR(**kwargs) builds the model (ATTR may be dotted,
                                         e.g. mypkg.nets:Nets.small); its weights come from a plain
                                         state_dict file, loaded with weights_only=True and strict keys

Factory kwargs are `&`-separated `key=value` pairs after `?`; each value is read as a Python literal
(`10`, `0.5`, `True`, `None`, `'a'`, `(1, 2)`) and otherwise kept as a string, e.g.
`factory:torchvision.models:resnet18?num_classes=10`.

robustdata never unpickles arbitrary objects (a pickle can run any code): a state_dict holding anything but
tensors and plain containers is refused. Save weights with `torch.save(model.state_dict(), path)`.

Inputs: robustdata feeds float images in [0, 1], (N, C, H, W). A model trained on normalised inputs gets
`normalize=(mean, std)` (per channel); `ExternalClassifier` then feeds it `(x - mean) / std`.

Layer names always resolve against the user's model, never the wrapper: "layer4" reads the user model's
`layer4` whether or not it is wrapped (the wrapper's `LAYERS` maps each name to the inner module).
"penultimate" is the input of the last nn.Linear, "last_conv" the last top-level child holding a
convolution (robustdata.train.models.layer_module).

TorchScript: a loaded ScriptModule supports neither forward hooks (RuntimeError "not supported on
ScriptModules") nor get_submodule, and its submodules are not nn.Linear instances (their class name is in
`original_name`). So layers are read from the graph instead: the forward graph is inlined, each node knows
the module instance it came from (Node.getModuleHierarchy), and a layer's output is the one tensor its
nodes hand to the rest of the graph (its input, for "penultimate"). A copy of the graph returning that
tensor runs in place of forward while a hook watches the layer's stand-in module (`taps`). Works for
scripted and traced modules and any module name from named_modules(); refused with a clear error: a module
called more than once (e.g. torchvision's shared `relu`), one returning several tensors, one only inside
control flow (if/loop), frozen modules (torch.jit.freeze drops submodules and parameters).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import io
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from robustdata.errors import DataError, RobustDataError
from robustdata.io import sha256_bytes
from robustdata.train.models import layer_module

SPEC_KINDS = ("torchscript", "factory")
LINEAR_NAMES = ("Linear", "NonDynamicallyQuantizableLinear")  # isinstance(m, nn.Linear) in eager models
SHOWN_KEYS = 5  # keys named in a mismatch error; the rest are counted


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # one of SPEC_KINDS
    path: Path | None = None  # torchscript archive
    module: str = ""  # factory's module and attribute
    attr: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_spec(spec: str) -> ModelSpec:
    """`torchscript:PATH` or `factory:MODULE:ATTR[?K=V&...]` (module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SPEC_KINDS or not rest:
        raise RobustDataError(f"bad model spec {spec!r}; valid: 'torchscript:PATH' or "
                              "'factory:MODULE:ATTR[?key=value&...]'")
    if kind == "torchscript":  # the path is taken whole: it may contain ':' or '?'
        return ModelSpec("torchscript", path=Path(rest))
    target, _, query = rest.partition("?")
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise RobustDataError(f"bad factory spec {spec!r}: expected 'factory:MODULE:ATTR', "
                              "e.g. 'factory:torchvision.models:resnet18?num_classes=10'")
    return ModelSpec("factory", module=module, attr=attr, kwargs=parse_kwargs(query, spec))


def parse_kwargs(query: str, spec: str) -> dict[str, Any]:
    """`k=v&k2=v2` -> {k: literal(v)}; a value that is not a Python literal stays a string."""
    kwargs: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise RobustDataError(f"bad factory argument {pair!r} in {spec!r}: expected key=value")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


# --------------------------------------------------------------------------- factory + state_dict


def import_factory(module: str, attr: str) -> Callable[..., Any]:
    """MODULE.ATTR (ATTR may be dotted); errors say what was imported and what was looked up."""
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise RobustDataError(f"factory {module}:{attr}: tried `import {module}`, which failed ({exc}); "
                              "is the package installed in this environment and on PYTHONPATH?") from exc
    for depth, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module, *attr.split(".")[:depth]])
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=5)
            raise RobustDataError(f"factory {module}:{attr}: imported {module}, but {where} has no attribute "
                                  f"{part!r}" + (f"; close matches: {close}" if close else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise RobustDataError(f"factory {module}:{attr} is a {type(obj).__name__}, not callable")
    return obj


def build_factory_model(spec: ModelSpec) -> nn.Module:
    factory = import_factory(spec.module, spec.attr)
    name = f"{spec.module}:{spec.attr}"
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:  # wrong or missing keyword: the signature tells the user what it takes
        raise RobustDataError(f"factory {name} rejected arguments {spec.kwargs}: {exc}; "
                              f"signature: {signature_of(factory)}") from exc
    if not isinstance(model, nn.Module):
        raise RobustDataError(f"factory {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def signature_of(fn: Callable[..., Any]) -> str:
    import inspect

    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):  # builtins and some C extensions have none
        return "unknown"


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"no such {what} file", path=path) from exc
    except OSError as exc:
        raise DataError(f"cannot read the {what} ({exc.strerror})", path=path) from exc


def read_state_dict(path: Path, data: bytes, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Tensors only: weights_only=True never runs code from the file, so a file that needs more is refused."""
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for objects outside its allow-list
        refused = str(exc).splitlines()[-1] if "Weights only load failed" in str(exc) else str(exc)
        raise DataError("refused: the file pickles objects other than tensors and plain containers "
                        f"({shorten(refused, 200)}). robustdata never unpickles arbitrary objects (that could "
                        "run code); save a plain state_dict: torch.save(model.state_dict(), path)",
                        path=path) from exc
    except Exception as exc:  # torch raises RuntimeError & co. for corrupt or foreign files
        raise DataError(f"not a loadable state_dict ({type(exc).__name__}: {shorten(str(exc), 200)})",
                        path=path) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:SHOWN_KEYS] if isinstance(state, Mapping) else type(state).__name__
        raise DataError(f"not a state_dict (name -> tensor); found {keys}: a training checkpoint? save "
                        "model.state_dict() alone", path=path)
    return dict(state)


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every key of the model and of the file must match: a partial load would audit a half-random model."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise DataError(f"state_dict does not fit the model: {shorten(str(exc), 400)}", path=path) from exc
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "; keys start with 'module.' (saved from DataParallel): save model.module.state_dict()"
        raise DataError(f"state_dict does not fit the model: missing keys {key_list(missing)}, "
                        f"unexpected keys {key_list(unexpected)}{hint}", path=path)


def key_list(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"[{shown}" + (f", ... {len(keys) - SHOWN_KEYS} more]" if len(keys) > SHOWN_KEYS else "]")


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------- torchscript


def load_torchscript(path: Path, data: bytes, device: torch.device | str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated for torch.export; users still ship archives
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch raises RuntimeError with a C++ trace for non-archives
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"not a TorchScript archive ({shorten(first, 200)}); save one with "
                        "torch.jit.save(torch.jit.script(model), path), or use a factory:... spec",
                        path=path) from exc
    if next(model.parameters(), None) is None:
        raise DataError("the TorchScript module has no parameters (frozen with torch.jit.freeze?): its layers "
                        "cannot be read; save it unfrozen", path=path)
    return model


def module_path(hierarchy: str) -> str:
    """'SELF(ResNet).layer4(Sequential).1(BasicBlock).relu(ReLU).UNKNOWN_INSTANCE(UNKNOWN_TYPE)' ->
    'layer4.1.relu': SELF marks a method called on the same module, UNKNOWN_INSTANCE a plain function."""
    names = re.findall(r"([^.()]+)\([^()]*\)", hierarchy)
    return ".".join(n for n in names if n not in ("SELF", "UNKNOWN_INSTANCE"))


def inside(path: str, layer: str) -> bool:
    return path == layer or path.startswith(layer + ".")


def layer_value(graph: torch._C.Graph, layer: str, read_input: bool) -> torch._C.Value:
    """The tensor `layer`'s nodes hand to the rest of the inlined graph (or take from it: read_input).

    Only top-level nodes count. GetAttr and Constant values (weights, literals) are not activations, and
    uses by nodes the result does not depend on are not hand-overs: inlined input checks (`input.dim()`
    before a raise) carry no module hierarchy and would otherwise look like consumers."""
    nodes = list(graph.nodes())
    region = {n for n in nodes if inside(module_path(n.getModuleHierarchy()), layer)}
    if not region:
        raise RobustDataError(f"TorchScript layer {layer!r} is never called at the top level of forward "
                              "(unused, or only inside control flow)")
    if read_input:
        values = [v for n in nodes if n in region for v in n.inputs()
                  if v.node() not in region and v.node().kind() not in ("prim::GetAttr", "prim::Constant")]
    else:
        live = live_nodes(graph)
        values = [v for n in nodes if n in region for v in n.outputs()
                  if any(use.user not in region and use.user in live for use in v.uses())]
    tensors = list(dict.fromkeys(v for v in values if isinstance(v.type(), torch._C.TensorType)))
    if len(tensors) != 1:
        raise RobustDataError(f"TorchScript layer {layer!r} {'takes' if read_input else 'returns'} "
                              f"{len(tensors)} tensors in the graph (a module called more than once, or "
                              "several inputs/outputs); pick another layer")
    return tensors[0]


def live_nodes(graph: torch._C.Graph) -> set[torch._C.Node]:
    """The return node and every node whose outputs it depends on, through values used inside if/loop blocks."""
    live, stack = set(), [graph.return_node()]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        used = list(node.inputs())
        for inner in block_nodes(node):
            used.extend(inner.inputs())
        stack.extend(v.node() for v in used)
    return live


def block_nodes(node: torch._C.Node) -> list[torch._C.Node]:
    """Nodes nested in `node`'s blocks, at any depth, with the blocks' return nodes."""
    found = []
    for block in node.blocks():
        for inner in [*block.nodes(), block.returnNode()]:
            found.append(inner)
            found.extend(block_nodes(inner))
    return found


def inlined_forward(script: torch.jit.ScriptModule) -> torch._C.Graph:
    """forward's graph with every call inlined. Taken at load time, before any call: a module run under
    torch.jit.optimized_execution(False) was seen to return a graph without its module hierarchy after."""
    graph = script.forward.graph.copy()
    if len(list(graph.inputs())) != 2:
        raise RobustDataError("the TorchScript module's forward must take exactly one input (the images)")
    torch._C._jit_pass_inline(graph)
    return graph


def tap_function(inlined: torch._C.Graph, requests: Sequence[tuple[str, bool]]) -> Callable[..., Any]:
    """fn(script._c, x) -> (logits, *values of `requests`): the inlined forward, returning more."""
    graph = inlined.copy()
    taps = [layer_value(graph, layer, read_input) for layer, read_input in requests]
    logits = next(graph.outputs())
    graph.eraseOutput(0)
    for value in (logits, *taps):
        graph.registerOutput(value)
    graph.makeMultiOutputIntoTuple()
    return torch._C._create_function_from_graph("robustdata_tap", graph)


def script_layers(script: torch.jit.ScriptModule) -> dict[str, tuple[str, bool]]:
    """{layer name: (module path, read its input?)}: every module, plus penultimate and last_conv."""
    modules = list(script.named_modules())
    layers = {name: (name, False) for name, _ in modules if name}
    linears = [name for name, m in modules if getattr(m, "original_name", "") in LINEAR_NAMES]
    if linears:
        layers["penultimate"] = (linears[-1], True)
    convs = [name for name, child in script.named_children()
             if any(getattr(m, "original_name", "").startswith("Conv") for m in child.modules())]
    if convs:
        layers["last_conv"] = (convs[-1], False)
    return layers


# --------------------------------------------------------------------------- wrapper


class ExternalClassifier(nn.Module):
    """The user's model (`self.model`), fed `(x - mean) / std` when normalising; layer names resolve against
    the user's model through `LAYERS`, which robustdata.train.models.layer_module consults first.

    For a TorchScript model each layer has an identity stand-in in `taps`: representation() hooks the
    stand-in, and forward then runs the graph returning that layer's tensor and passes it through."""

    def __init__(self, model: nn.Module, normalize: tuple[Sequence[float], Sequence[float]] | None = None):
        super().__init__()
        self.model = model
        self.normalizing = normalize is not None
        if normalize is not None:
            mean, std = normalize_tensors(normalize)
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
        self.scripted = isinstance(model, torch.jit.ScriptModule)
        self.LAYERS: dict[str, str] = {}
        self.tap_layers: dict[str, tuple[str, bool]] = {}  # tap key -> (module path, read input?)
        self.tap_functions: dict[tuple[str, ...], Callable[..., Any]] = {}  # cache per set of hooked taps
        if self.scripted:
            self.inlined = inlined_forward(model)
            self.taps = nn.ModuleDict()
            for name, (path, read_input) in script_layers(model).items():
                key = name.replace(".", "/")  # ModuleDict keys cannot hold '.'
                self.taps[key] = nn.Identity()
                self.tap_layers[key] = (path, read_input)
                self.LAYERS[name] = f"taps.{key}"
        else:
            self.LAYERS = eager_layers(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalizing:
            x = (x - self.mean) / self.std
        if not self.scripted:
            return self.model(x)
        hooked = tuple(k for k, tap in self.taps.items() if tap._forward_hooks or tap._forward_pre_hooks)
        if hooked and hooked not in self.tap_functions:
            self.tap_functions[hooked] = tap_function(self.inlined, [self.tap_layers[k] for k in hooked])
        # The JIT's profiling executor runs the first calls as written and may run later ones fused (GPU
        # fusers): features could depend on a batch's position, so on how the audit is split into chunks.
        # Unoptimised, every batch runs the ops the graph names, and no compile time goes to a single pass.
        with torch.jit.optimized_execution(False):
            if not hooked:
                return self.model(x)
            logits, *values = self.tap_functions[hooked](self.model._c, x)
        for key, value in zip(hooked, values):
            self.taps[key](value)  # fires representation()'s hook with the layer's tensor
        return logits


def eager_layers(model: nn.Module) -> dict[str, str]:
    """{layer name: 'model.<path>'} for every module and named layer of the inner model whose output is read.
    "penultimate" as the input of the last Linear is left out: layer_module finds the same Linear itself."""
    paths = {id(m): name for name, m in model.named_modules()}
    names = [*(n for n in paths.values() if n), *getattr(model, "LAYERS", {}), "last_conv"]
    layers = {}
    for name in names:
        try:
            module, read_input = layer_module(model, name)
        except (RobustDataError, IndexError):  # no such layer in this architecture
            continue
        if not read_input and module is not model:
            layers[name] = f"model.{paths[id(module)]}"
    return layers


def normalize_tensors(normalize: tuple[Sequence[float], Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, C, 1, 1) float32 tensors; std must be positive."""
    try:
        mean, std = (torch.tensor([float(v) for v in part], dtype=torch.float32) for part in normalize)
    except (TypeError, ValueError) as exc:
        raise RobustDataError(f"normalize must be (mean, std), two lists of numbers; got {normalize!r}") from exc
    if mean.numel() == 0 or mean.shape != std.shape or not bool((std > 0).all()):
        raise RobustDataError(f"normalize needs one mean and one positive std per channel; got {normalize!r}")
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------- public


def load_external_model(spec: str, device: torch.device | str = "cpu", *, state_dict: str | Path | None = None,
                        normalize: tuple[Sequence[float], Sequence[float]] | None = None
                        ) -> tuple[nn.Module, dict[str, Any]]:
    """The user's classifier in eval mode on `device`, and a sidecar like load_model's.

    Sidecar: arch ("torchscript" or "external:MODULE:ATTR"), spec, weights_path, weights_sha256 (of the
    archive or state_dict file), kwargs, normalize, classes (None: an external model does not record them).
    """
    parsed = parse_spec(spec)
    if parsed.kind == "torchscript":
        if state_dict is not None:
            raise RobustDataError("a TorchScript archive holds its own weights: drop the state_dict")
        path = parsed.path
        data = read_bytes(path, "TorchScript archive")
        model: nn.Module = load_torchscript(path, data, device)
        arch = "torchscript"
    else:
        if state_dict is None:
            raise RobustDataError(f"model spec {spec!r} needs a state_dict file for its weights")
        path = Path(state_dict)
        data = read_bytes(path, "state_dict")
        model = build_factory_model(parsed)
        load_strict(model, read_state_dict(path, data, device), path)
        arch = f"external:{parsed.module}:{parsed.attr}"
    if parsed.kind == "torchscript" or normalize is not None:
        model = ExternalClassifier(model, normalize)
    sidecar = {"arch": arch, "spec": spec, "weights_path": str(path), "weights_sha256": sha256_bytes(data),
               "kwargs": parsed.kwargs, "normalize": [list(map(float, p)) for p in normalize] if normalize else None,
               "classes": None}
    return model.to(device).eval(), sidecar
