"""Reading other projects' pickles (nanoGPT's ``ckpt.pt`` and ``meta.pkl``, build-nanogpt's
checkpoints) without executing code from them.

A pickle can name any importable callable and call it while it loads (``os.system`` included), so
gptlab never uses a plain unpickler on a file it did not write. Torch files go through
``torch.load(weights_only=True)``, whose unpickler admits only tensors and plain containers; the
one foreign class those checkpoints hold -- build-nanogpt's ``GPTConfig`` dataclass -- is admitted
under its pickled names as :class:`ConfigRecord`, a plain attribute bag that reads its fields as
data and runs nothing. Plain pickles go through :class:`RestrictedUnpickler`, which admits plain
containers and the same config names and refuses every other global.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

# Where a GPTConfig is pickled from: the training script run as __main__, or imported as a module.
CONFIG_CLASS_NAMES = ("__main__.GPTConfig", "train_gpt2.GPTConfig", "model.GPTConfig")


class UnsafePickleError(GptlabError):
    """A pickle that would import or call something other than plain data."""


class ConfigRecord:
    """Stands in for a foreign config class: the pickled fields become attributes, nothing is called."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafePickleError(f"config object state is a {type(state).__name__}, not a dict of fields")
        self.__dict__.update(state)

    def fields(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"ConfigRecord({self.__dict__})"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, strings, numbers (which need no global),
    ``collections.OrderedDict``, and the known config class names (as :class:`ConfigRecord`)."""

    _ALLOWED = {("collections", "OrderedDict"): "OrderedDict"}

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" in CONFIG_CLASS_NAMES:
            return ConfigRecord
        if (module, name) in self._ALLOWED:
            import collections

            return collections.OrderedDict
        raise UnsafePickleError(f"refuses to load {module}.{name}: gptlab reads only plain data from pickles, "
                                f"never code")


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """The data in a plain pickle file (e.g. nanoGPT's ``meta.pkl``), refusing anything but data."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return RestrictedUnpickler(f).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{p}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise GptlabError(f"{p}: not a readable pickle ({type(e).__name__}: {e})") from None


def loads_plain_pickle(data: bytes) -> Any:
    """:func:`load_plain_pickle` for bytes already in memory."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with the known config classes read as :class:`ConfigRecord`."""
    import torch

    p = Path(path)
    safe = [(ConfigRecord, name) for name in CONFIG_CLASS_NAMES]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        what = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise UnsafePickleError(f"{p}: refuses to load: the file names code, not just data ({what}); gptlab loads "
                                f"checkpoints with torch.load(weights_only=True) and never runs their code") from None
    except (RuntimeError, EOFError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptlabError(f"{p}: not a readable PyTorch file ({reason})") from None
