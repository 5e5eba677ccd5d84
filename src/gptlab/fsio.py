"""File helpers shared by shard, manifest, checkpoint and weight readers/writers (no torch import at module level)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk before it is renamed into place."""
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse directory fsync
        pass
    finally:
        os.close(fd)


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """All tensors of a ``.safetensors`` file; a damaged or truncated file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"{path}: cannot read the weights ({reason}); the file is damaged or incomplete: "
                          "restore it from another checkpoint or export it again") from None
