"""Run-time adaptations that let the ORIGINAL AlphaEdit/MEMIT/ROME code run here.

Nothing of the original code is copied: :func:`install` puts a user-supplied checkout on
``sys.path`` and patches, in this process only, what today's environment does differently
from the one the code was written for. Every patch is listed in :data:`ADAPTATIONS` (the
fixture's README repeats the list):

* ``cpu``: the original hard-codes CUDA (``.cuda()``, ``.to("cuda")``, ``device="cuda"`` in
  ``torch.zeros/tensor/eye``); the device ``cuda`` is mapped to ``cpu``.
* ``decoder_tuple``: transformers 5 decoder layers return a tensor, 4.x returned a tuple whose
  element 0 is the hidden state, which the original indexes (``cur_out[0][i, idx]``,
  ``tr[...].output[0]``). ``util.nethook.Trace`` is subclassed so that a decoder layer's
  tensor output is presented as a 1-tuple to ``edit_output`` and in ``.output``, as in 4.x;
  the model itself still sees the tensor.
* ``cwd``: ``util/globals.py`` reads ``globals.yml`` from the working directory, so the
  process changes into the checkout before importing it.

Load the model BEFORE :func:`install`: a model loaded while the factory functions are wrapped
returned NaN from padded forwards (and degenerate sampled text) under transformers 5.24.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch

ADAPTATIONS = {
    "cpu": "device 'cuda' mapped to 'cpu' in Tensor.to/.cuda and torch.zeros/tensor/eye "
           "(the original hard-codes CUDA)",
    "decoder_tuple": "util.nethook.Trace subclassed: a decoder layer's tensor output "
                     "(transformers 5) is shown to edit_output and .output as the 1-tuple "
                     "transformers 4.x returned",
    "cwd": "working directory set to the checkout (util/globals.py opens ./globals.yml)",
}


def _map_device(d: Any) -> Any:
    if isinstance(d, str) and d.startswith("cuda"):
        return "cpu"
    if isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("cpu")
    return d


def _install_cpu() -> None:
    if getattr(torch.Tensor.to, "_parity_cpu", False):
        return
    orig_to = torch.Tensor.to

    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        args = tuple(_map_device(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return orig_to(self, *args, **kwargs)

    to._parity_cpu = True  # type: ignore[attr-defined]
    torch.Tensor.to = to  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    for name in ("zeros", "tensor", "eye"):
        fn = getattr(torch, name)

        def wrapped(*args, _fn=fn, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _map_device(kwargs["device"])
            return _fn(*args, **kwargs)

        setattr(torch, name, wrapped)


def _install_decoder_tuple() -> None:
    import util.nethook as nh

    if getattr(nh.Trace, "_parity", False):
        return
    base = nh.Trace

    class Trace(base):  # type: ignore[misc, valid-type]
        _parity = True

        def __init__(self, module, layer=None, retain_output=True, retain_input=False,
                     clone=False, detach=False, retain_grad=False, edit_output=None,
                     stop=False):
            target = nh.get_module(module, layer) if layer is not None else module
            self._as_tuple = type(target).__name__.endswith("DecoderLayer")
            if self._as_tuple and edit_output is not None:
                user_fn = edit_output

                def edit_output(output, layer):
                    if not isinstance(output, torch.Tensor):
                        return nh.invoke_with_optional_args(user_fn, output=output,
                                                            layer=layer)
                    out = nh.invoke_with_optional_args(user_fn, output=(output,), layer=layer)
                    return out[0] if isinstance(out, tuple) else out

            super().__init__(module, layer, retain_output, retain_input, clone, detach,
                             retain_grad, edit_output, stop)

        @property
        def output(self):
            out = self.__dict__.get("_output")
            if self._as_tuple and isinstance(out, torch.Tensor):
                return (out,)
            return out

        @output.setter
        def output(self, value):
            self.__dict__["_output"] = value

    nh.Trace = Trace


ALPHAEDIT_FILES = ("rome/compute_v.py", "memit/memit_main.py", "AlphaEdit/AlphaEdit_main.py",
                   "util/nethook.py", "globals.yml")


def install(checkout: str | Path, need: tuple[str, ...] = ALPHAEDIT_FILES,
            repo: str = "github.com/jianghoucheng/AlphaEdit") -> Path:
    """Put ``checkout`` (a clone of ``repo`` holding the files ``need``) first on
    ``sys.path``, change into it, patch (``decoder_tuple`` only where it has MEMIT's
    ``util/nethook.py``)."""
    root = Path(checkout).expanduser().resolve()
    for f in need:
        if not (root / f).is_file():
            raise SystemExit(f"--checkout {root}: {f} missing (expected a clone of {repo})")
    os.chdir(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _install_cpu()
    if (root / "util" / "nethook.py").is_file():
        _install_decoder_tuple()
    return root
