"""Self-contained remote code for a release, generated from the package (never a second copy kept by hand).

transformers' `trust_remote_code` copies one flat folder of modules that import each other as `from .x import Y`
and import nothing that is not installed on the user's side. This module collects the modules a variant needs
(configuration, modeling, processing and everything they import relatively), flattens their names
(`hf_vla/heads/mlp_resnet.py` → `mlp_resnet.py`), rewrites their relative imports accordingly, writes them beside the
weights and sets `auto_map`, so `AutoModel.from_pretrained(repo, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(repo, trust_remote_code=True)` work where hf_vla is not installed.

    python -m hf_vla.hub.remote_code MODEL_DIR     (without MODEL_DIR: a smoke run on a tiny model)
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

PACKAGE = "hf_vla"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _module_path(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    candidate = PACKAGE_ROOT / relative
    return candidate / "__init__.py" if candidate.is_dir() else candidate.with_suffix(".py")


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def _smoke_run_line(tree: ast.Module) -> int | None:
    """First line of the module's `if __name__ == "__main__":` smoke run, which remote code leaves out (it imports
    the package's test helpers, and transformers would fetch every module a remote file imports)."""
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
            return node.lineno
    return None


def _relative_imports(module: str) -> list[tuple[ast.ImportFrom, str]]:
    path = _module_path(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    end = _smoke_run_line(tree)
    found = []
    for node in ast.walk(tree):
        if end is not None and getattr(node, "lineno", 0) >= end:
            continue
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module is None:
                raise ValueError(f"{path}: `from . import x` is not supported in exported modules")
            found.append((node, _resolve(module, path.name == "__init__.py", node.level, node.module)))
    return found


def module_closure(roots: list[str]) -> list[str]:
    """The roots and every module they import relatively, transitively (function-level imports included)."""
    seen, stack = [], list(roots)
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.append(module)
        stack.extend(target for _, target in _relative_imports(module))
    return seen


def flat_name(module: str) -> str:
    return module.split(".")[-1]


def flatten_module(module: str) -> str:
    """The module's source with each relative import rewritten to `from .<flat name> import ...`."""
    path = _module_path(module)
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    end = _smoke_run_line(ast.parse(source))
    if end is not None:
        lines = lines[: end - 1]
        while lines and not lines[-1].strip():
            lines.pop()
    for node, target in sorted(_relative_imports(module), key=lambda item: -item[0].lineno):
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        indent = lines[node.lineno - 1][: node.col_offset]
        replacement = f"{indent}from .{flat_name(target)} import {names}\n"
        lines[node.lineno - 1 : node.end_lineno] = [replacement]
    header = f"{GENERATED_HEADER}{module}; edit the package, not this file.\n"
    return header + "".join(lines)


def export_remote_code(model_dir: str | Path) -> list[str]:
    """Writes the flat modules of the model's variant into `model_dir` and the `auto_map` entries into
    `config.json` and `processor_config.json`. Returns the written file names."""
    from ..auto import VARIANTS

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = config["model_type"]
    if model_type not in VARIANTS:
        raise ValueError(f"config.json model_type: unknown variant {model_type!r}; known: {sorted(VARIANTS)}")
    config_class, model_class = VARIANTS[model_type]
    roots = [config_class.__module__, model_class.__module__, f"{PACKAGE}.processing_vla"]
    modules = module_closure(roots)
    names = [flat_name(m) for m in modules]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"remote code: modules would share flat names {sorted(duplicates)}")
    written = []
    for module in modules:
        (model_dir / f"{flat_name(module)}.py").write_text(flatten_module(module), encoding="utf-8")
        written.append(f"{flat_name(module)}.py")

    config["auto_map"] = {
        "AutoConfig": f"{flat_name(config_class.__module__)}.{config_class.__name__}",
        "AutoModel": f"{flat_name(model_class.__module__)}.{model_class.__name__}",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor_config_path = model_dir / "processor_config.json"
    if processor_config_path.exists():
        processor_config = json.loads(processor_config_path.read_text(encoding="utf-8"))
        processor_config["auto_map"] = {"AutoProcessor": "processing_vla.VLAProcessor"}
        processor_config_path.write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    return written


GENERATED_HEADER = "# Generated by hf_vla.hub.remote_code from "


@functools.lru_cache(maxsize=1)
def generated_module_names() -> frozenset[str]:
    """The file names `export_remote_code` can write, over every variant (parsed once per process: a push asks for
    every file on the branch)."""
    from ..auto import VARIANTS

    roots = [m.__module__ for classes in VARIANTS.values() for m in classes] + [f"{PACKAGE}.processing_vla"]
    return frozenset(f"{flat_name(module)}.py" for module in module_closure(roots))


def remove_remote_code(model_dir: str | Path) -> list[str]:
    """Undoes `export_remote_code`: deletes the generated modules (recognised by their header) and the `auto_map`
    entries, so that a release without remote code does not carry an earlier export's. Returns the deleted names."""
    model_dir = Path(model_dir)
    deleted = []
    for path in sorted(model_dir.glob("*.py")):
        with path.open(encoding="utf-8") as file:
            if file.readline().startswith(GENERATED_HEADER):
                path.unlink()
                deleted.append(path.name)
    for name in ("config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            if config.pop("auto_map", None) is not None:
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return deleted


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the self-contained modules that let a saved model directory "
                                                 "load with trust_remote_code=True (no hf_vla installed).")
    parser.add_argument("model_dir", nargs="?", help="a saved model directory (default: a tiny GR00T, for a look)")
    args = parser.parse_args()
    if args.model_dir:
        print("\n".join(export_remote_code(args.model_dir)))
    else:  # smoke run: the release folder of a tiny model
        import tempfile

        from ..testing import build_tiny_vla

        model, processor = build_tiny_vla("gr00t")
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            processor.save_pretrained(directory)
            print("remote code of a tiny GR00T release:", ", ".join(export_remote_code(directory)))
            print("auto_map:", json.loads((Path(directory) / "config.json").read_text())["auto_map"])
