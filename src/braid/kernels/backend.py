"""Which implementation runs each op: its pure-PyTorch reference or a fast GPU backend.

The choice comes from BRAID_KERNELS (read once at import; `use_backends` changes it in code):

    auto (default)       the first fast backend of the op's preference list (FAST_BACKENDS)
                         that imports and supports the call, else the reference; backends
                         in OPT_IN run only when named
    reference            every op runs its reference (the CPU path and the test oracle)
    ssd=mamba_ssm,...    per-op choices, optionally after a default for the other ops:
                         "reference,attention=flex" or "auto,norm=liger"

A fast backend is only ever used on plain CUDA tensors (not CPU tensors, not tensor
subclasses such as DTensor) that are not float64, and only for calls it supports (each op's
dispatcher names the backends that cannot run the call as `unsupported`); otherwise the op
falls back to its reference.
A forced backend that is missing or cannot run the call falls back the same way, so
`pick` is the way to ask what will run. Inside torch.compile the element-wise ops
(FUSED_BY_COMPILE) take their reference, which inductor fuses on its own.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

REFERENCE = "reference"
AUTO = "auto"

# Fast backends per op, most preferred first; each maps to the braid module that wraps it.
FAST_BACKENDS: dict[str, tuple[str, ...]] = {
    "ssd": ("fla", "mamba_ssm"),
    "ssd_step": ("fla",),
    "ssd_pass": ("triton",),  # a step inside mamba_ssm's SSD; its fallback ("reference") is mamba_ssm's kernels
    "conv": ("triton", "fla"),  # braid's own: faster in the hybrid (docs/benchmarks.md); fla's for conv states
    "gla": ("fla",),
    "gla_step": ("fla",),
    "gla_intra": ("triton",),  # steps inside fla's GLA; their fallback ("reference") is fla's kernels
    "gla_scan": ("triton",),  # the same for GLA's pass over the chunks (fla's chunk_fwd_h, chunk_bwd_dh)
    "gla_dv": ("triton",),  # the same for GLA's value gradient (fla's chunk_gla_bwd_dv)
    "attention": ("sdpa", "flash_attn", "cudnn", "flex", "torch_flash"),
    "norm": ("triton", "liger"),
    "gated_norm": ("triton",),
    "swiglu": ("liger",),
    "swiglu_stacked": ("triton",),  # braid's own, under torch.compile too (not in FUSED_BY_COMPILE)
    "cross_entropy": ("liger",),
    "moe": ("grouped_mm",),
    "router": ("triton",),
    "moe_combine": ("triton",),  # the weighted combine's backward
}
BACKEND_MODULES: dict[tuple[str, str], str] = {
    ("ssd", "fla"): "braid.kernels.ssd.fla",
    ("ssd", "mamba_ssm"): "braid.kernels.ssd.mamba_ssm",
    ("ssd_step", "fla"): "braid.kernels.ssd.fla",
    ("ssd_pass", "triton"): "braid.kernels.ssd.pass_triton",
    ("conv", "fla"): "braid.kernels.ssd.fla",
    ("conv", "triton"): "braid.kernels.ssd.conv_triton",
    ("gla", "fla"): "braid.kernels.gla.fla",
    ("gla_step", "fla"): "braid.kernels.gla.fla",
    ("gla_intra", "triton"): "braid.kernels.gla.intra_triton",
    ("gla_scan", "triton"): "braid.kernels.gla.scan_triton",
    ("gla_dv", "triton"): "braid.kernels.gla.dv_triton",
    ("attention", "sdpa"): "braid.kernels.attention.sdpa",
    ("attention", "flash_attn"): "braid.kernels.attention.flash",
    ("attention", "cudnn"): "braid.kernels.attention.cudnn",
    ("attention", "flex"): "braid.kernels.attention.flex",
    ("attention", "torch_flash"): "braid.kernels.attention.torch_flash",
    ("norm", "triton"): "braid.kernels.norm.triton",
    ("norm", "liger"): "braid.kernels.norm.liger",
    ("gated_norm", "triton"): "braid.kernels.norm.triton",
    ("swiglu", "liger"): "braid.kernels.swiglu.liger",
    ("swiglu_stacked", "triton"): "braid.kernels.swiglu.stacked_triton",
    ("cross_entropy", "liger"): "braid.kernels.cross_entropy.liger",
    ("moe", "grouped_mm"): "braid.kernels.moe.grouped_mm",
    ("router", "triton"): "braid.kernels.moe.router_triton",
    ("moe_combine", "triton"): "braid.kernels.moe.combine_triton",
}
FUSED_BY_COMPILE = frozenset({"norm", "gated_norm", "swiglu"})
# Backends that run only when forced (e.g. BRAID_KERNELS="conv=triton"), not under auto: a new
# kernel waits here until its GPU parity test and a benchmark have run.
OPT_IN: frozenset[tuple[str, str]] = frozenset({("gla_scan", "triton"), ("moe_combine", "triton")})

_settings: dict[str, str] = {}
_default = [AUTO]
_probed: dict[str, str | None] = {}  # module -> None if it imports, else why not


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """("auto" | "reference", {op: backend}) from a BRAID_KERNELS string."""
    default, per_op = AUTO, {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            if item not in (AUTO, REFERENCE):
                raise ValueError(f"BRAID_KERNELS: {item!r} is not 'auto' or 'reference' (or op=backend)")
            default = item
            continue
        op, backend = (s.strip() for s in item.split("=", 1))
        if op not in FAST_BACKENDS:
            raise ValueError(f"BRAID_KERNELS: unknown op {op!r}; ops are {', '.join(FAST_BACKENDS)}")
        if backend not in (AUTO, REFERENCE, *FAST_BACKENDS[op]):
            choices = ", ".join((AUTO, REFERENCE, *FAST_BACKENDS[op]))
            raise ValueError(f"BRAID_KERNELS: op {op!r} has no backend {backend!r}; choose one of {choices}")
        per_op[op] = backend
    return default, per_op


def configure(spec: str) -> None:
    """Set the backend choice from a BRAID_KERNELS-style string (see the module docstring)."""
    default, per_op = parse_spec(spec)
    _default[0] = default
    _settings.clear()
    _settings.update(per_op)


def current_spec() -> str:
    """The active choice as a BRAID_KERNELS string."""
    return ",".join([_default[0], *(f"{op}={b}" for op, b in sorted(_settings.items()))])


@contextlib.contextmanager
def use_backends(spec: str) -> Iterator[None]:
    """Run a block with another backend choice, e.g. `with use_backends("reference"):`."""
    previous = current_spec()
    configure(spec)
    try:
        yield
    finally:
        configure(previous)


_loaded: dict[str, object] = {}  # module name -> the imported braid wrapper module


def _probe(module: str) -> str | None:
    try:
        _import(module)
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def _fla_gated_backward_refused() -> str | None:
    """fla 0.6.0 raises in `chunk_bwd_dqkwg` (fla/ops/common/chunk_o.py) when it gets a gate, on
    Hopper with Triton in [3.4.0, 3.7.1) unless tilelang is installed (fla #640: that kernel
    miscompiles there). chunk_simple_gla, which braid's fla SSD path calls, goes through it;
    chunk_gla (GLA) has its own backward kernels and is not refused. Seen on the GPU image's
    Triton 3.6.0, 2026-11-27. The refusal is right at braid's state size too: with the guard
    lifted, an H200 gave a right forward but gradients with relative errors of 1.4-1.5 at N=128
    (BK=128), not only at the BK=64 that #640 names (2026-11-28, docs/benchmarks.md, twelfth measurement)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        import triton
    except ImportError:
        return None
    version = tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in triton.__version__.split(".")[:3])
    if (3, 4, 0) <= version < (3, 7, 1) and importlib.util.find_spec("tilelang") is None:
        return (
            f"fla's gated chunk_bwd_dqkwg (chunk_simple_gla's backward) is refused on Hopper with Triton "
            f"{triton.__version__} (fla #640); install Triton >= 3.7.1 or tilelang"
        )
    return None


def _cudnn_band_before_hopper() -> str | None:
    """cuDNN's banded attention (nvidia-cudnn-frontend) is validated (GPU parity tests) and
    measured on Hopper; older GPUs keep FlexAttention rather than meet an unsupported graph in
    the middle of a backward."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
        return "cuDNN banded attention is used on Hopper (sm90) and newer GPUs only"
    return None


# Calls whose fast backend imports but is known not to work (or not validated) on this machine.
KNOWN_BROKEN = {("ssd", "fla"): _fla_gated_backward_refused, ("attention", "cudnn"): _cudnn_band_before_hopper}
_broken: dict[tuple[str, str], str | None] = {}


def backend_module(op: str, backend: str):
    """The imported braid wrapper module of a fast backend (ImportError if it cannot load).

    A dict lookup once loaded: torch.compile traces through it, where a call to
    importlib.import_module is a graph break (dynamo skips importlib), one per kernel call."""
    module = BACKEND_MODULES[(op, backend)]
    if module not in _loaded:
        _import(module)
    return _loaded[module]


@torch.compiler.disable
def _import(module: str) -> None:
    _loaded[module] = importlib.import_module(module)


def available(op: str, backend: str) -> bool:
    """Whether the fast backend imports here and is not known broken (probed once per module)."""
    module = BACKEND_MODULES[(op, backend)]
    if module not in _probed or (op, backend) not in _broken:
        _probe_once(op, backend)
    return _probed[module] is None and _broken[(op, backend)] is None


@torch.compiler.disable
def _probe_once(op: str, backend: str) -> None:
    """Import the backend's module and run its known-broken check, outside any torch.compile
    trace: dynamo tracing the import of fla fails (its module-level torch version check raises
    under dynamo; torch 2.11, fla 0.6.0). `probe_all` before compiling avoids even this break."""
    module = BACKEND_MODULES[(op, backend)]
    if module not in _probed:
        reason = _probed[module] = _probe(module)
        # A package that is not installed is expected; one that is installed but fails is news.
        if reason is not None and not reason.startswith("ModuleNotFoundError") and torch.cuda.is_available():
            warnings.warn(f"braid kernels: backend {backend!r} for {op!r} is unavailable: {reason}", stacklevel=3)
    if (op, backend) not in _broken:
        check = KNOWN_BROKEN.get((op, backend))
        _broken[(op, backend)] = check() if check is not None else None


def probe_all() -> None:
    """Import every fast backend now (before torch.compile traces a model that dispatches to them)."""
    for op, backends in FAST_BACKENDS.items():
        for backend in backends:
            available(op, backend)


def unavailable_reason(op: str, backend: str) -> str | None:
    """Why a backend cannot run here (None if it can)."""
    available(op, backend)
    return _probed[BACKEND_MODULES[(op, backend)]] or _broken[(op, backend)]


def _plain_cuda(tensors: Iterable[Tensor | None]) -> bool:
    """Every given tensor is a CUDA torch.Tensor or Parameter (no subclass such as DTensor), not float64."""
    seen = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_cuda or t.dtype == torch.float64:
            return False
        seen = True
    return seen


def pick(
    op: str, *tensors: Tensor | None, unsupported: Iterable[str] = (), order: tuple[str, ...] | None = None
) -> str:
    """The backend that runs `op` on these input tensors: a fast backend's name or "reference".

    `unsupported` names fast backends that cannot run this particular call; `order` replaces
    the op's preference list under auto for a kind of call that another backend serves best.
    """
    if not _plain_cuda(tensors) or (op in FUSED_BY_COMPILE and torch.compiler.is_compiling()):
        return REFERENCE
    return _choose(op, unsupported, order)


def _choose(op: str, unsupported: Iterable[str] = (), order: tuple[str, ...] | None = None) -> str:
    """The configured choice for `op` among the backends that import here and are not excluded."""
    choice = _settings.get(op, _default[0])
    if choice == REFERENCE:
        return REFERENCE
    excluded = set(unsupported)
    if choice == AUTO:
        excluded |= {name for kind, name in OPT_IN if kind == op}
    candidates = (order or FAST_BACKENDS[op]) if choice == AUTO else (choice,)
    for backend in candidates:
        if backend not in excluded and available(op, backend):
            return backend
    return REFERENCE


def report() -> list[str]:
    """One line per op: what the current choice runs for a plain CUDA call on this machine (a
    kind of call a backend does not support still falls back), then each fast backend's status."""
    cuda = torch.cuda.is_available()
    lines = []
    for op, backends in FAST_BACKENDS.items():
        statuses = []
        for name in backends:
            reason = unavailable_reason(op, name)
            status = "available" if reason is None else f"unavailable: {reason}"
            statuses.append(f"{name} ({status}{', opt-in' if (op, name) in OPT_IN else ''})")
        runs = _choose(op) if cuda else "reference (no CUDA device)"
        lines.append(f"{op:14s} runs {runs:12s} | {'; '.join(statuses)}")
    return lines


configure(os.environ.get("BRAID_KERNELS", AUTO))
