"""The typed functions behind ``generate.py`` (a fire CLI): no logic lives in the CLI itself.

torch and the modules that import it are imported by the commands that use them, so that
``generate.py --help`` answers in a fraction of a second instead of the ~3 s that importing torch takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from policy_server.errors import ClientGenerationFailed, Conflict, NotFound, SchemaError

if TYPE_CHECKING:
    import torch

    from policy_server.export import ExportFormat
    from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


EXAMPLE_BUILDERS: dict[str, str] = {
    "llm": "examples/llm/build_tiny_model.py",
    "alphabetical": "examples/alphabetical/pretrain.py",
    "atari": "examples/atari/build_model.py",
    "masked": "examples/masked/scheduler.py",
}
"""Examples whose models are built here rather than committed (no downloads): the script whose
``build_models(out_dir, progress)`` writes them, by the example folder's name."""


def copy_server_files(example: str, target: str = ".", force: bool = False) -> str:
    """Copy an example's schema.yaml and models/ next to app.py, so `uvicorn app:app` serves it.

    An example whose models are built rather than committed (examples/llm, alphabetical, atari)
    and not built yet gets them built into ``<target>/models``, offline, with a progress bar.
    The target's schema.yaml and models/ are replaced when its schema.yaml is an example's (as
    copied); one of the user's own is kept unless ``force``.
    Raises ``SchemaError`` if the copy still cannot be served, ``Conflict`` if the target holds a
    schema.yaml of the user's own and ``force`` is not given.
    """
    source, dest = Path(example), Path(target)
    if not (source / "schema.yaml").is_file():
        raise SchemaError(f"{source}/schema.yaml not found; examples: {', '.join(_examples())}")
    if not force and _users_own(dest / "schema.yaml"):
        raise Conflict(
            f"{dest / 'schema.yaml'} is no example's schema (yours?): nothing copied; pass --force to "
            "replace it and the models/ beside it"
        )
    shutil.copy(source / "schema.yaml", dest / "schema.yaml")
    builds = source.name in EXAMPLE_BUILDERS
    if ((source / "models").is_dir() or builds) and (dest / "models").exists():
        shutil.rmtree(dest / "models")
    if (source / "models").is_dir():
        shutil.copytree(source / "models", dest / "models")
    elif builds:
        build_example_models(source.name, dest / "models")
    from policy_server.schema.config import load_schema

    load_schema(dest / "schema.yaml")  # what uvicorn would refuse, refused here
    start = "uvicorn app:app" if dest.resolve() == ROOT else f"SCHEMA_PATH={dest.resolve() / 'schema.yaml'} uvicorn app:app"
    return f"copied {source} → {dest.resolve()}; start it with `{start}`"


def _users_own(schema: Path) -> bool:
    """Whether ``schema`` exists and is none of examples/'s schema.yaml files, byte for byte."""
    if not schema.is_file():
        return False
    text = schema.read_bytes()
    return all(text != example.read_bytes() for example in (ROOT / "examples").glob("*/schema.yaml"))


def build_example_models(example: str, out_dir: Path) -> None:
    """Run ``EXAMPLE_BUILDERS[example]`` into ``out_dir`` (created), with a tqdm bar per stage."""
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    builder = _load_script(ROOT / EXAMPLE_BUILDERS[example])
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar, ours, not one per file transformers writes
    try:
        with tqdm(desc=f"building the {example} models", unit="step") as bar:
            def progress(stage: str, done: int, total: int) -> None:
                if bar.desc != stage:
                    bar.set_description_str(stage, refresh=False)
                    bar.reset(total)
                bar.update(done - bar.n)

            builder.build_models(out_dir, progress)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_script(path: Path) -> ModuleType:
    """A script of examples/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"examples.{path.parent.name}.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a Python script")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up while the file executes
    spec.loader.exec_module(module)
    return module


def _examples() -> list[str]:
    return sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "examples").glob("*/schema.yaml"))


def check(schema: str = "schema.yaml") -> dict[str, Any]:
    """Validate a schema and its models without serving; raise SchemaError on the first problem.

    Returns what was checked: ``policies`` (name → observation width, action space, ...), for a
    schema with an ``llm:`` section ``llm`` (``policy`` / ``value`` → ``describe_llm_model``), and
    ``resources``: what each deployment and trainer asks Ray for, the total, and this machine's
    CPUs, GPUs and memory (``resources.resource_report``; a schema too large for this machine is
    reported, not refused: a cluster may be larger).
    """
    from policy_server.policies.served import resolve_candidate, resolve_policy
    from policy_server.schema.config import load_schema
    from policy_server.serving.runtime.resources import resource_report, resource_requests

    loaded = load_schema(schema)
    served = {name: resolve_policy(spec)[0] for name, spec in loaded.policies.items()}
    for policy in served.values():
        resolve_candidate(policy)  # a canary that start-up would refuse is refused here too
    checked: dict[str, Any] = {"policies": {name: policy.describe() for name, policy in served.items()}}
    if loaded.llm is not None:
        from policy_server.llm.checkpoint import check_section

        check_section(loaded.llm)
        models = {"policy": loaded.llm.policy, "value": loaded.llm.value}
        checked["llm"] = {kind: describe_llm_model(spec) for kind, spec in models.items() if spec is not None}
    machine = local_machine()
    checked["resources"] = resource_report(resource_requests(loaded, machine["GPU"] > 0), machine)
    return checked


def schema(
    env: str,
    out: str = "schema.yaml",
    model: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    api_key: str | None = None,
    force: bool = False,
) -> str:
    """Write a schema.yaml whose ``observation_space`` and ``action_space`` are ``env``'s.

    ``env``: a registered id (``CartPole-v1``, ``ALE/Pong-v5``), ``module:EnvId``, or an entry point
    (``module:attr`` or ``file.py:attr``: a class or a function returning an environment), made with
    ``env_kwargs``. ``model``: the model file the schema serves (written relative to the schema's
    folder; default: the one file in ``models/`` beside it, found when the server starts).
    An existing ``out`` is kept unless ``force`` (as ``copy_server_files`` keeps a user's files).
    Raises SchemaError for an environment that cannot be made, a space the server cannot serve, or
    an existing ``out`` without ``force``.
    """
    if Path(out).exists() and not force:
        raise SchemaError(f"{out} exists: pass --out <another file>, or --force to replace it")
    from policy_server.envs import env_schema, make_env

    if env_kwargs is not None and not isinstance(env_kwargs, dict):  # fire passes what it cannot parse as text
        raise SchemaError(f"--env_kwargs: a mapping such as '{{\"is_slippery\": False}}', not {env_kwargs!r}")
    made = make_env(env, env_kwargs)
    try:
        target = Path(out)
        relative = None if model is None else os.path.relpath(Path(model).resolve(), target.resolve().parent)
        doc = env_schema(made, relative, api_key)
    finally:
        made.close()
    target.write_text(f"# written by `python generate.py schema --env {env}`\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return f"wrote {target} for {env}: observation_space {doc['observation_space']['type']}, " \
           f"action_space {doc['parameters']['action_space']['type']}"


def local_machine() -> dict[str, float]:
    """This machine's CPUs (those this process may run on), GPUs (torch's count) and memory (bytes)."""
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count()), "memory": float(memory)}


def describe_llm_model(spec: LLMPolicySpec | LLMValueSpec) -> dict[str, Any]:
    """What a user checks of a served LLM: its folder, architecture, size (parameters counted from
    the safetensors headers, None for other weights files), dtype and device; for the policy its
    engine, model id and adapters (model id → folder)."""
    from policy_server.llm.checkpoint import read_config, weight_shapes
    from policy_server.schema.llm import LLMPolicySpec

    config = read_config(spec.path, "llm")
    described: dict[str, Any] = {
        "path": str(spec.path),
        "architectures": config.get("architectures"),
        "parameters": sum(math.prod(shape) for shape in weight_shapes(spec.path).values()) or None,
        "dtype": spec.dtype,
        "device": spec.device,
        "adapter": str(spec.adapter) if spec.adapter else None,
        "training": spec.training is not None,
    }
    if isinstance(spec, LLMPolicySpec):
        described |= {"engine": spec.engine, "served_name": spec.model_id,
                      "adapters": {name: str(folder) for name, folder in spec.adapters.items()}}
    return described


def _load_user_module(module: str) -> torch.nn.Module:
    """``package.module:factory`` → the nn.Module that calling ``factory()`` returns."""
    import torch

    path, _, attr = module.partition(":")
    if not attr:
        raise ValueError(f"--module must look like package.module:factory, got {module!r}")
    factory = getattr(importlib.import_module(path), attr)
    built = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(built, torch.nn.Module):
        raise ValueError(f"{module} gave a {type(built).__name__}, not a torch.nn.Module")
    return built


def export(
    out: str,
    obs_dim: int,
    module: str | None = None,
    state_dict: str | None = None,
    hidden: tuple[int, ...] = (64, 64),
    nvec: tuple[int, ...] | None = None,
    box_dim: int | None = None,
    activation: str = "tanh",
    fmt: ExportFormat = "export",
    schema: str | None = None,
    action_names: tuple[str, ...] | None = None,
    api_key: str | None = None,
) -> str:
    """Export a policy to a file the server loads, and optionally write a matching schema.

    Either ``module`` (``package.module:factory`` returning an nn.Module), or an MLP spec
    (``hidden``, and ``nvec`` for discrete/tuple or ``box_dim`` for continuous actions); in both
    cases ``state_dict`` (a ``torch.save``d state dict) loads the trained weights.
    """
    if fmt not in ("export", "torchscript", "onnx"):
        raise ValueError(f"--fmt must be export, onnx or torchscript, not {fmt!r}")
    import torch

    from policy_server.export import MLPPolicy, export_module, write_schema

    sizes = _as_list(nvec)
    net = _load_user_module(module) if module else MLPPolicy(obs_dim, list(hidden), sizes, box_dim, activation)
    if state_dict:
        net.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    path = export_module(net, obs_dim, Path(out), fmt)
    if schema:
        space: dict[str, Any]
        if box_dim:
            space = {"type": "box", "shape": [box_dim]}
        elif sizes and len(sizes) > 1:
            space = {"type": "tuple", "nvec": sizes}
        else:
            space = {"type": "discrete", "n": sizes[0] if sizes else None}
            if action_names:
                space["names"] = list(action_names)
        observations = {f"obs_{i}": {"type": "float"} for i in range(obs_dim)}
        model_rel = Path(path).resolve().relative_to(Path(schema).resolve().parent)
        write_schema(Path(schema), observations, space, str(model_rel), api_key)
        check(schema)
    return str(path)


def import_model(model: str, out: str | None = None, schema: str | None = None, policy: str | None = None) -> dict[str, Any]:
    """Read a Stable-Baselines3 ``.zip`` or an ONNX file with its own library. With ``schema``,
    check that schema's policy (``policy``; default: its default policy) against the file, with
    start-up's errors; else write a schema from the file's spaces to ``out`` (default:
    ``schema.yaml`` beside the model; SB3 files only, ONNX files hold no spaces).
    Returns what start-up resolved; raises SchemaError naming the field and both values."""
    from policy_server.policies.importing import import_model as run

    return run(Path(model), Path(out) if out else None, Path(schema) if schema else None, policy)


def clients(
    schema: str = "schema.yaml",
    out: str = "clients",
    languages: str | tuple[str, ...] | None = None,
    cache_dir: str | None = None,
) -> str:
    """Write client SDKs for a schema's API to ``out``: Python, and Java, Scala, R, TypeScript and Go
    when `java` is on PATH. ``languages``: a comma-separated subset (default: all). Ray is not started."""
    from tqdm import tqdm

    from policy_server.gateway.app import build_app
    from policy_server.sdks import ClientSDKs, parse_languages
    from policy_server.settings import Settings

    chosen = parse_languages(languages, field="languages")
    # the server's own settings otherwise, so the document (and the cache key) is the one it serves
    app = build_app(Settings(schema_path=Path(schema), backend="local", gateway_metrics_port=0))
    sdks = ClientSDKs(Path(cache_dir) if cache_dir else None, languages=chosen)
    with tqdm(total=len(chosen), desc="client SDKs", unit="language") as bar:
        def advance(language: str, state: str) -> None:
            bar.set_postfix_str(f"{language}: {state}")
            bar.update()

        progress = sdks.generate(app.openapi(), advance)
    if progress.status == "failed":
        raise ClientGenerationFailed(f"client SDK generation failed: {progress.error}")
    target = sdks.export(Path(out), chosen).resolve()
    lines = [f"wrote {', '.join(progress.done()) or 'no SDK'} to {target} (see its README.md)"]
    lines += [f"{', '.join(langs)} {state}: {note}" for state, langs, note in progress.problems()]
    return "\n".join(lines)


def export_minari(log_folder: str, dataset_id: str, policy: str | None = None, datasets_path: str | None = None) -> dict[str, Any]:
    """Write an experience log folder (``experience_log.path``) as the local Minari dataset ``dataset_id``
    (in ``datasets_path``, default Minari's: ``MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).

    Raises NotFound (no log, no spaces file of the policy) and Conflict (nothing to export, the policy
    must be named, a dataset of that id exists already)."""
    if datasets_path is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(datasets_path).resolve())
    from policy_server.experience_log.minari_export import export_minari as export

    try:
        return export(log_folder, dataset_id, policy)
    except FileNotFoundError as exc:
        raise NotFound(str(exc)) from None
    except ValueError as exc:
        raise Conflict(str(exc)) from None


def parse_dataclass_args(cls: type[T], description: str | None = None, argv: list[str] | None = None) -> T:
    """A ``--flag`` per field of the dataclass ``cls`` (``total_timesteps`` → ``--total-timesteps``),
    typed and defaulted as the field is (a bool is a ``--flag`` / ``--no-flag`` switch): the
    command line of the training scripts."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    return cls(**vars(parser.parse_args(argv)))


def _as_list(values: Any) -> list[int] | None:
    if values is None:
        return None
    return [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
