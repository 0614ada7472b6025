"""Small hooks on named modules: read inputs/outputs, stop a forward pass early, edit outputs.

All helpers are context managers that register PyTorch hooks on ``model.get_submodule(name)``
and remove them on exit (also when the body raises), so no hook outlives its ``with`` block.

* :func:`capture_inputs` / :func:`capture_outputs`: record, per forward call, the input (first
  positional argument) or the output of named modules. For an MLP output projection ``W`` the
  input is the key tensor ``K`` of shape ``(batch, seq, d_in)``.
* :func:`on_inputs`: call a function on those inputs instead of storing them (streaming use,
  e.g. accumulating ``K^T K`` without keeping ``K``).
* :class:`StopForward` and :func:`stop_after`: raise after a module has run, so a forward pass
  can end after the deepest layer that is needed; :func:`stop_after` swallows the exception.
* :func:`edit_output`: replace a module's output ``y`` by ``fn(y)``.

Tuple outputs (e.g. decoder layers returning ``(hidden, attn, ...)``) are handled by acting on
element ``0`` (the hidden states) and passing the other elements through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

__all__ = [
    "StopForward",
    "capture_inputs",
    "capture_outputs",
    "edit_output",
    "on_inputs",
    "stop_after",
]


def _first_tensor(value: Any) -> Tensor:
    """``value`` if it is a tensor, else its element 0 (tuple/list outputs)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple whose first element is one, got "
                    f"{type(value).__name__}")


def _modules(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    out = []
    for name in names:
        try:
            out.append((name, model.get_submodule(name)))
        except AttributeError as exc:
            raise KeyError(f"model has no module named {name!r}") from exc
    return out


@contextmanager
def on_inputs(model: nn.Module,
              callbacks: dict[str, Callable[[Tensor], None]]) -> Iterator[None]:
    """Call ``callbacks[name](x)`` with the first positional input ``x`` of each named module.

    ``x`` is the live tensor (e.g. ``(batch, seq, d_in)`` for a Linear layer); the callback
    must not modify it in place. The callback's return value is ignored (the input is
    unchanged).
    """
    handles = []
    try:
        for name, module in _modules(model, callbacks):
            fn = callbacks[name]

            def pre_hook(_mod: nn.Module, args: tuple[Any, ...], _fn=fn) -> None:
                _fn(_first_tensor(args))

            handles.append(module.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_inputs(model: nn.Module, module_names: Iterable[str],
                   detach: bool = True, clone: bool = True) -> Iterator[dict[str, list[Tensor]]]:
    """Record the first positional input of each named module, one tensor per forward call.

    Yields ``{name: [x_1, x_2, ...]}``, filled as forward passes run inside the block; ``x_j``
    has the module's input shape, e.g. ``(batch, seq, d_in)``. ``clone`` copies the tensor so a
    later in-place change by the model cannot alter the record.
    """
    names = list(module_names)
    store: dict[str, list[Tensor]] = {n: [] for n in names}

    def make(name: str) -> Callable[[Tensor], None]:
        def record(x: Tensor) -> None:
            y = x.detach() if detach else x
            store[name].append(y.clone() if clone else y)

        return record

    with on_inputs(model, {n: make(n) for n in names}):
        yield store


@contextmanager
def capture_outputs(model: nn.Module, module_names: Iterable[str],
                    detach: bool = True, clone: bool = True) -> Iterator[dict[str, list[Tensor]]]:
    """Record the output of each named module (element 0 of a tuple output), per forward."""
    names = list(module_names)
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = []
    try:
        for name, module in _modules(model, names):

            def hook(_mod: nn.Module, _args: Any, output: Any, _name=name) -> None:
                y = _first_tensor(output)
                y = y.detach() if detach else y
                store[_name].append(y.clone() if clone else y)

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by the hook of :func:`stop_after` once the named module has produced its output."""


@contextmanager
def stop_after(model: nn.Module, module_name: str) -> Iterator[None]:
    """End any forward pass inside the block right after ``module_name`` has run.

    A forward hook on the module raises :class:`StopForward`; the context manager swallows it,
    so the statement that runs the model simply returns early (without a value). Hooks that
    read inputs of earlier modules (e.g. :func:`on_inputs`) have already fired. Put only the
    forward call inside the block: statements after it are skipped when the pass stops. Run the
    model with ``use_cache=False`` so no partial KV cache is left behind.
    """
    (_, module), = _modules(model, [module_name])

    def hook(_mod: nn.Module, _args: Any, _output: Any) -> None:
        raise StopForward(module_name)

    handle = module.register_forward_hook(hook)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def edit_output(model: nn.Module, module_name: str,
                fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output ``y`` of ``module_name`` by ``fn(y)`` in every forward inside the block.

    For a tuple output ``(y, *rest)`` the module returns ``(fn(y), *rest)``. ``fn`` must return a
    tensor of the same shape as ``y`` (e.g. ``(batch, seq, d_model)``); it may be differentiable
    (target optimisation adds a trainable ``delta`` at chosen positions).
    """
    (_, module), = _modules(model, [module_name])

    def hook(_mod: nn.Module, _args: Any, output: Any) -> Any:
        y = _first_tensor(output)
        new = fn(y)
        if not isinstance(new, Tensor) or new.shape != y.shape:
            raise ValueError(f"edit_output({module_name!r}): fn must return a tensor of shape "
                             f"{tuple(y.shape)}, got "
                             f"{getattr(new, 'shape', type(new).__name__)}")
        if isinstance(output, Tensor):
            return new
        if isinstance(output, list):
            return [new, *output[1:]]
        return (new, *output[1:])

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
