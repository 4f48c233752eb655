"""Model folders as bytes, so a replica on another node needs no shared file system.

``pack_folder`` reads a ``save_pretrained`` folder into ``{relative path: bytes}``;
``unpack_folder`` writes one back; ``unpack_model`` writes a model and its optional LoRA adapter
into a fresh temporary folder, as every replica and trainer that loads one does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

Folder = dict[str, bytes]
"""Every file of a folder, by its path relative to the folder."""


def pack_folder(path: Path) -> Folder:
    """Every file under ``path``, by its relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def unpack_folder(files: Folder, dest: Path) -> Path:
    """Write ``files`` under ``dest``; raises ValueError for a name that leads outside it."""
    for name, data in files.items():
        target = (dest / name).resolve()
        if dest.resolve() not in target.parents:
            raise ValueError(f"refusing to write {name!r} outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest


def unpack_model(
    model: Folder, adapter: Folder | None, prefix: str, parent: Path | None = None
) -> tuple[Path, Path | None]:
    """Write a model folder and its optional adapter into a new temporary folder named ``prefix…``
    (in ``parent``, else the system's temporary folder).

    Returns ``(model folder, adapter folder or None)``, the arguments ``load_policy`` and
    ``load_value`` take.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder = unpack_folder(model, root / "model")
    lora = unpack_folder(adapter, root / "adapter") if adapter is not None else None
    return folder, lora
