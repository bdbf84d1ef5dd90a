"""Built-in model zoo: small, well-known architectures in plain torch, ready to trace.

Every model here is traceable by :func:`torch.fx.symbolic_trace` (no data-dependent Python
control flow), so the CLI, the tests and the benchmarks can feed any of them to capture.
Large models are built on the ``meta`` device by default, which allocates nothing.

Example::

    >>> from fxshard import zoo
    >>> zm = zoo.build("gpt2-tiny", batch_size=2, seq_len=16)
    >>> zm.model(*zm.example_inputs).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fxshard.errors import ZooError
from fxshard.models import (
    GPT2,
    MLP,
    GPT2Config,
    Inception,
    InceptionConfig,
    Llama,
    LlamaConfig,
    MLPConfig,
    ResNet,
    ResNetConfig,
    UNet,
    UNetConfig,
)

__all__ = [
    "ZooModel", "names", "describe", "build", "load_factory", "resolve",
    "MLP", "MLPConfig", "ResNet", "ResNetConfig", "UNet", "UNetConfig",
    "Inception", "InceptionConfig", "GPT2", "GPT2Config", "Llama", "LlamaConfig",
]


@dataclass(frozen=True, eq=False)
class ZooModel:
    """A model together with example inputs that drive one forward pass."""

    name: str
    model: nn.Module
    example_inputs: tuple
    description: str
    example_kwargs: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Number of unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.model.parameters())


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """How to build one zoo name: model class and config, input shape and defaults."""

    cls: Callable[..., nn.Module]
    config: object
    summary: str
    batch_size: int = 8
    seq_len: int | None = None  # set for language models only
    input_shape: tuple[int, ...] = ()  # per-sample shape of a float input (vision, mlp)
    device: str = "cpu"
    dtype: torch.dtype | None = None  # the big decoders default to bf16, as they are trained


_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry(cls=MLP, config=MLPConfig(), summary="8-layer 1024-wide Linear+GELU MLP",
                  batch_size=32, input_shape=(1024,)),
    "resnet": _Entry(cls=ResNet, config=ResNetConfig(), batch_size=32, input_shape=(3, 224, 224),
                     summary="ResNet-50 bottleneck CNN, 224x224 images"),
    "unet": _Entry(cls=UNet, config=UNetConfig(), batch_size=16, input_shape=(3, 256, 256),
                   summary="U-Net, 4 levels with concatenated skips, 256x256 images"),
    "inception": _Entry(cls=Inception, config=InceptionConfig(), batch_size=32,
                        input_shape=(3, 299, 299),
                        summary="Inception-v3-like branchy CNN, 299x299 images"),
    "gpt2": _Entry(cls=GPT2, config=GPT2Config(), seq_len=1024,
                   summary="GPT-2 small decoder, tied LM head"),
    "gpt2-tiny": _Entry(cls=GPT2, config=GPT2Config(n_layer=2, n_head=4, n_embd=64,
                                                    vocab_size=256, block_size=64),
                        seq_len=64, summary="2-layer 64-wide GPT-2 for tests"),
    "gpt2-xl": _Entry(cls=GPT2, config=GPT2Config(n_layer=48, n_head=25, n_embd=1600),
                      seq_len=1024, device="meta", dtype=torch.bfloat16, summary="GPT-2 XL decoder, tied LM head"),
    "llama-tiny": _Entry(cls=Llama, config=LlamaConfig(dim=64, n_layers=2, n_heads=4,
                                                       n_kv_heads=2, ffn_hidden=172,
                                                       vocab_size=256, max_seq_len=64),
                         seq_len=64, summary="2-layer 64-wide LLaMA with GQA for tests"),
    "llama-7b": _Entry(cls=Llama, config=LlamaConfig(), seq_len=2048, device="meta", dtype=torch.bfloat16,
                       summary="LLaMA-7B decoder (RMSNorm, RoPE, SwiGLU)"),
    "llama-70b": _Entry(cls=Llama, config=LlamaConfig(dim=8192, n_layers=80, n_heads=64,
                                                      n_kv_heads=8, ffn_hidden=28672,
                                                      max_seq_len=4096),
                        seq_len=4096, device="meta", dtype=torch.bfloat16,
                        summary="LLaMA-2-70B decoder, grouped-query attention (8 kv heads)"),
}


def _describe_model(summary: str, model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
    return f"{summary} ({count} params)"


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ZooError(f"bad device {device!r}; use e.g. 'cpu', 'cuda:0' or 'meta'") from e


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise ZooError(f"dtype={dtype} is not a floating dtype; use e.g. torch.bfloat16")


def _move(x: object, device: torch.device | None, dtype: torch.dtype | None) -> object:
    """Move a tensor input to ``device``; cast it to ``dtype`` only if it is floating."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.to(device=device, dtype=dtype if x.is_floating_point() else None)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside a forked RNG, so the caller's random stream is left untouched."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def names() -> list[str]:
    """Sorted list of the built-in model names."""
    return sorted(_REGISTRY)


def describe() -> list[tuple[str, str]]:
    """``(name, one-line description with parameter count)`` for every built-in model.

    Models are built on the meta device, so this is cheap even for the 70B one.
    """
    return [(n, build(n, device="meta").description) for n in names()]


def build(name: str, *, batch_size: int | None = None, seq_len: int | None = None,
          device: str | torch.device | None = None, dtype: torch.dtype | None = None,
          seed: int = 0) -> ZooModel:
    """Build a built-in model and example inputs for it.

    Args:
        name: one of :func:`names`.
        batch_size: batch dimension of the example inputs (default per model).
        seq_len: sequence length for language models (default per model); an error for others.
        device: where to build; defaults to ``cpu``, or ``meta`` for gpt2-xl and the llamas.
        dtype: floating dtype to cast parameters, buffers and float inputs to; defaults to
            float32, or bfloat16 for gpt2-xl, llama-7b and llama-70b.
        seed: seeds weight init and example inputs, so builds are reproducible.

    Raises:
        ZooError: unknown name or invalid option.

    Example::

        >>> build("llama-70b").model.output.weight.device
        device(type='meta')
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ZooError(f"unknown model {name!r}{hint} Known models: {', '.join(names())}. Or "
                       f"pass a factory reference 'path/to/file.py:fn' or 'package.module:fn'.")
    bs = entry.batch_size if batch_size is None else batch_size
    if bs < 1:
        raise ZooError(f"batch_size={bs}; use a positive batch size")
    t = entry.seq_len if seq_len is None else seq_len
    if entry.seq_len is None and seq_len is not None:
        lms = ", ".join(n for n in names() if _REGISTRY[n].seq_len)
        raise ZooError(f"{name!r} is not a language model and takes no seq_len "
                       f"(only {lms} do); drop seq_len")
    if t is not None:
        limit = getattr(entry.config, "block_size", None) or entry.config.max_seq_len
        if not 1 <= t <= limit:
            raise ZooError(f"seq_len={t} for {name!r}; use 1..{limit} (its context length)")
    _check_dtype(dtype)
    dtype = entry.dtype if dtype is None else dtype
    dev = _device(entry.device if device is None else device)
    with _seeded(seed, dev), torch.device(dev):
        model = entry.cls(entry.config)
        if t is None:
            x = torch.randn(bs, *entry.input_shape)
        else:
            x = torch.randint(0, entry.config.vocab_size, (bs, t), dtype=torch.long)
    if dtype is not None:
        model.to(dtype=dtype)
    return ZooModel(name, model, (_move(x, None, dtype),), _describe_model(entry.summary, model))


def _import_file(path: Path, ref: str) -> ModuleType:
    if not path.is_file():
        raise ZooError(f"factory file {str(path)!r} (from {ref!r}) does not exist; "
                       f"check the path, relative to {str(Path.cwd())!r}")
    # A unique module name lets two factory files with the same stem coexist.
    mod_name = f"_fxshard_factory_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ZooError(f"cannot load {str(path)!r} as Python; give a .py file")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so dataclasses and pickling in the file can find their module.
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ZooError(f"importing factory file {str(path)!r} failed: {e!r}") from e
    return module


def _import_module(name: str, ref: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ZooError(f"no module named {name!r} (from {ref!r}); install it, add its "
                           f"directory to PYTHONPATH, or give a path to a .py file") from e
        raise ZooError(f"importing {name!r} failed: {e!r}") from e
    except Exception as e:
        raise ZooError(f"importing {name!r} failed: {e!r}") from e


def load_factory(ref: str) -> ZooModel:
    """Load a user model from ``"path/to/file.py:factory"`` or ``"package.module:factory"``.

    ``factory()`` takes no arguments and returns one of:

    - ``(model, (x, y))``: positional inputs (a single tensor counts as one input);
    - ``(model, {"input_ids": ids, ...})``: keyword inputs, as Hugging Face models take them;
    - ``(model, (x,), {"mask": m})``: both.

    Raises:
        ZooError: malformed reference, missing file, module or attribute, or a factory that
            fails or returns the wrong thing.
    """
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise ZooError(f"bad factory reference {ref!r}; write 'path/to/file.py:factory' or "
                       f"'package.module:factory'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(Path(where).expanduser().resolve(), ref)
    else:
        module = _import_module(where, ref)
    factory = getattr(module, attr, None)
    if factory is None:
        close = difflib.get_close_matches(attr, [a for a in dir(module) if a[0] != "_"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ZooError(f"{where!r} has no attribute {attr!r}{hint}")
    if not callable(factory):
        raise ZooError(f"{ref!r} is a {type(factory).__name__}, not a function; point the "
                       f"reference at a function returning (model, example_inputs)")
    try:
        result = factory()
    except Exception as e:
        raise ZooError(f"factory {ref!r} raised {e!r}") from e
    want = ("return (model, (inputs...)), (model, {keyword inputs}) or (model, (inputs...), "
            "{keyword inputs})")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        size = f" of {len(result)} items" if isinstance(result, (tuple, list)) else ""
        raise ZooError(f"factory {ref!r} returned {type(result).__name__}{size}; {want}")
    model, inputs, kwargs = result[0], result[1], (result[2] if len(result) == 3 else {})
    if len(result) == 2 and isinstance(inputs, Mapping):
        inputs, kwargs = (), inputs  # keyword inputs only
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    ok = (isinstance(model, nn.Module) and isinstance(inputs, (tuple, list))
          and isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs))
    if not ok:
        got = ", ".join(type(r).__name__ for r in result)
        raise ZooError(f"factory {ref!r} returned ({got}); {want}, with an nn.Module model, "
                       f"a tuple of positional inputs and a dict of keyword inputs keyed by argument name")
    desc = _describe_model(f"factory {ref}", model)
    return ZooModel(ref, model, tuple(inputs), desc, dict(kwargs))


def resolve(name_or_ref: str, *, batch_size: int | None = None, seq_len: int | None = None,
            device: str | torch.device | None = None, dtype: torch.dtype | None = None,
            seed: int = 0) -> ZooModel:
    """Build a zoo model by name, or load a factory reference (anything with a ``:``).

    For factories, ``seed`` seeds the call, ``device`` and ``dtype`` are applied afterwards,
    and ``batch_size``/``seq_len`` are refused since the factory fixes its own shapes.
    """
    if name_or_ref in _REGISTRY or ":" not in name_or_ref:
        return build(name_or_ref, batch_size=batch_size, seq_len=seq_len, device=device,
                     dtype=dtype, seed=seed)
    if batch_size is not None or seq_len is not None:
        raise ZooError(f"batch_size/seq_len cannot be applied to factory {name_or_ref!r}; "
                       f"set the input shapes inside the factory")
    _check_dtype(dtype)
    dev = None if device is None else _device(device)
    with _seeded(seed):
        zm = load_factory(name_or_ref)
    if dev is None and dtype is None:
        return zm
    zm.model.to(device=dev, dtype=dtype)
    inputs = tuple(_move(x, dev, dtype) for x in zm.example_inputs)
    kwargs = {k: _move(v, dev, dtype) for k, v in zm.example_kwargs.items()}
    return ZooModel(zm.name, zm.model, inputs, zm.description, kwargs)
