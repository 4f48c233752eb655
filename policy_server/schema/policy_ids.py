"""A ``policies_dir``: one model file per policy id, the id being the file's stem (``acme.pt`` →
``acme``). Pure functions over a folder listing; no torch, no Ray, no HTTP."""

from __future__ import annotations

from pathlib import Path

from policy_server.errors import SchemaError

MODEL_SUFFIXES = (".pt", ".pt2", ".ts", ".jit")
ID_RULE = "letters, digits, - and _"
MAX_ID_LENGTH = 128
"""Ids become Prometheus label values and Serve model ids: short text, no path separators."""


def is_name(text: str) -> bool:
    """The rule of policy names and policy ids: letters, digits, ``-`` and ``_``, not empty."""
    return bool(text) and text.replace("_", "").replace("-", "").isalnum()


def is_policy_id(text: str) -> bool:
    """A policy id: a name (``is_name``) of at most ``MAX_ID_LENGTH`` characters."""
    return len(text) <= MAX_ID_LENGTH and is_name(text)


def policy_files(folder: Path) -> dict[str, Path]:
    """Policy id → model file of ``folder``, in id order. Files of another suffix, hidden files and
    stems that break the id rule (``a.b.pt``, ``tmp~.pt``) are not ids; where two files share a
    stem (``a.pt``, ``a.pt2``), the first by name serves it. An unreadable folder holds none."""
    try:
        names = sorted(p for p in folder.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file())
    except OSError:
        return {}
    found: dict[str, Path] = {}
    for path in names:
        if is_policy_id(path.stem) and path.stem not in found:
            found[path.stem] = path
    return dict(sorted(found.items()))


def policy_file(folder: Path, policy_id: str) -> Path | None:
    """The model file of ``policy_id`` in ``folder`` (the first suffix of ``MODEL_SUFFIXES`` by
    name, as ``policy_files`` picks it), or None: no such file, or not a valid id (never a path
    outside ``folder``)."""
    if not is_policy_id(policy_id):
        return None
    candidates = sorted(folder / f"{policy_id}{suffix}" for suffix in MODEL_SUFFIXES)
    return next((path for path in candidates if path.is_file()), None)


def resolve_policies_dir(folder_text: str, model: str | None, base_dir: Path, where: str, trains: bool) -> tuple[Path, Path]:
    """The absolute ``policies_dir`` of a policy and the one file start-up checks against the schema
    (``model`` if given, else the folder's first policy file by id).

    Raises:
        SchemaError: with ``training`` (a trainer per policy id is not built), or a folder that is
            missing or holds no policy file, naming ``<where>.policies_dir``.
    """
    if trains:
        raise SchemaError(
            f"{where}.policies_dir: cannot be combined with `training`: a policy trains one model, and one "
            "trainer per policy id is not built; serve the trained policy as its own entry of `policies`"
        )
    folder = (base_dir / folder_text).resolve()
    if not folder.is_dir():
        raise SchemaError(
            f"{where}.policies_dir: {folder} is no folder (every node that runs a replica must read it at this path)"
        )
    files = policy_files(folder)
    if not files:
        raise SchemaError(
            f"{where}.policies_dir: {folder} holds no policy file (<policy id> of {ID_RULE}, then one of "
            f"{', '.join(MODEL_SUFFIXES)})"
        )
    if model is not None:
        path = (base_dir / model).resolve()
        if not path.is_file():
            raise SchemaError(f"{where}.model: model file not found: {path}")
        return folder, path
    return folder, next(iter(files.values()))
