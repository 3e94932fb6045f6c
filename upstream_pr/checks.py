"""Checks of a patched transformers tree that upstream's CI would make: modular and modeling files agree, and ruff."""

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .source_edits import decorator_names, find_class, find_function


ROPE_CACHE_DECORATORS = ("check_rope_cache", "split_at_rope_switch", "check_rope_cache_in_generation")
CHECKED_METHODS = ("forward", "prepare_inputs_for_generation")


def _rope_cache_mark(class_node: ast.ClassDef, method_name: str) -> tuple[str, ...] | None:
    """
    What the pull request put on a method: its rope-cache decorators, or `("checked generic",)` for the checked
    `prepare_inputs_for_generation` attribute. `None` when the class does not define the method.
    """
    for node in class_node.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == method_name for target in node.targets):
            return ("checked generic",) if "check_rope_cache_in_generation" in ast.unparse(node.value) else ()
    method = find_function(class_node.body, method_name)
    if method is None:
        return None
    return tuple(name for name in decorator_names(method) if name.split("(")[0] in ROPE_CACHE_DECORATORS)


def modeling_origins(modular: ast.Module) -> dict[str, str]:
    """Names imported from other models' modeling files -> that model's directory name."""
    origins = {}
    for node in modular.body:
        if not (isinstance(node, ast.ImportFrom) and node.module and ".modeling_" in node.module):
            continue
        # `from ..llama.modeling_llama import ...` or `from ...models.llama.modeling_llama import ...`
        parts = node.module.split(".")
        if node.level == 2 or (node.level == 3 and parts[0] == "models"):
            for alias in node.names:
                origins[alias.asname or alias.name] = parts[-2]
    return origins


def _suffix(class_name: str) -> str | None:
    return next((suffix for suffix in ("ForCausalLM", "Model") if class_name.endswith(suffix)), None)


def modular_agreement_problems(tree: Path, modeling_paths: list[str]) -> list[str]:
    """
    For each changed `modeling_<model>.py` whose model has a `modular_<model>.py`: every method the pull request
    marked in the modeling file is marked the same way in the modular file where that defines it, or else in the
    parent it inherits it from (whose generated copy the converter would bring). Returns the disagreements.
    """
    problems = []
    models_dir = tree / "src" / "transformers" / "models"
    for relative in modeling_paths:
        modeling_path = tree / relative
        model = modeling_path.parent.name
        modular_path = modeling_path.parent / f"modular_{model}.py"
        if not modeling_path.name.startswith("modeling_") or not modular_path.is_file():
            continue
        modeling = ast.parse(modeling_path.read_text(encoding="utf-8"))
        modular = ast.parse(modular_path.read_text(encoding="utf-8"))
        origins = modeling_origins(modular)
        parent_prefixes = parent_model_prefixes(modular, origins)
        for class_node in (node for node in modeling.body if isinstance(node, ast.ClassDef)):
            suffix = _suffix(class_node.name)
            for method_name in CHECKED_METHODS:
                mark = _rope_cache_mark(class_node, method_name)
                if not mark or suffix is None:
                    continue
                modular_class = find_class(modular, class_node.name)
                modular_mark = _rope_cache_mark(modular_class, method_name) if modular_class is not None else None
                if modular_mark is not None:
                    if modular_mark != mark:
                        problems.append(
                            f"{relative}: {class_node.name}.{method_name} is {mark} but the modular file defines it "
                            f"as {modular_mark}"
                        )
                    continue
                parent = parent_class(modular_class, origins, parent_prefixes, suffix)
                if parent is None:
                    problems.append(f"{relative}: cannot tell where {class_node.name}.{method_name} comes from")
                    continue
                parent_model, parent_name = parent
                parent_text = (models_dir / parent_model / f"modeling_{parent_model}.py").read_text(encoding="utf-8")
                parent_node = find_class(ast.parse(parent_text), parent_name)
                parent_mark = _rope_cache_mark(parent_node, method_name) if parent_node is not None else None
                if parent_mark != mark:
                    problems.append(
                        f"{relative}: {class_node.name}.{method_name} is {mark}, but the modular file inherits it "
                        f"from {parent_model}'s {parent_name}, where it is {parent_mark}"
                    )
    return problems


def parent_model_prefixes(modular: ast.Module, origins: dict[str, str]) -> Counter:
    """How often the modular file's classes inherit from each other model's classes: `(model, prefix) -> count`."""
    return Counter(
        (origins[base.id], base.id[: -len(_suffix(base.id))])
        for node in modular.body
        if isinstance(node, ast.ClassDef)
        for base in node.bases
        if isinstance(base, ast.Name) and base.id in origins and _suffix(base.id) and "PreTrained" not in base.id
    )


def parent_class(modular_class, origins, parent_prefixes: Counter, suffix: str) -> tuple[str, str] | None:
    """
    `(model, class name)` that a modular file's `suffix` class comes from: a base of `modular_class` imported from
    another model, or, for a class the modular file does not define (`None`), the converter's implicit copy of the
    model it inherits from most.
    """
    if modular_class is not None:
        for base in modular_class.bases:
            if isinstance(base, ast.Name) and base.id in origins and _suffix(base.id) == suffix:
                return origins[base.id], base.id
    if not parent_prefixes:
        return None
    (parent_model, parent_prefix), _ = parent_prefixes.most_common(1)[0]
    return parent_model, parent_prefix + suffix


BUNDLED_RUFF_SETTINGS = Path(__file__).parent / "ruff"


def ruff_config(tree: Path, release_major: int) -> Path:
    """
    transformers' ruff settings for `tree`: its own `pyproject.toml` where it has one (a checkout), else those of
    its major release, bundled here (a tree laid out from an installed release has no `pyproject.toml`).
    """
    pyproject = tree / "pyproject.toml"
    if pyproject.is_file() and "[tool.ruff]" in pyproject.read_text(encoding="utf-8"):
        return pyproject
    return BUNDLED_RUFF_SETTINGS / f"transformers-{release_major}.toml"


def _ruff(arguments: list[str], cwd: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *arguments], cwd=cwd, capture_output=True, text=True, check=False
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def ruff_problems(tree: Path, paths: list[str], config: Path) -> list[str]:
    """
    `ruff check` and `ruff format --check` findings on `paths` of `tree` with the settings in `config` (see
    `ruff_config`), as `path: CODE message` (without line numbers, so that findings before and after an edit
    compare).
    """
    settings = ["--config", str(config.resolve()), "--no-cache"]
    check = _ruff(["check", "--output-format=concise", *settings, *paths], tree)
    formatting = _ruff(["format", "--check", *settings, *paths], tree)
    findings = []
    for line in check:
        parts = line.split(":", 3)
        if len(parts) == 4 and parts[1].isdigit():
            findings.append(f"{parts[0]}:{parts[3]}")
    findings += [line for line in formatting if line.lower().startswith("would reformat")]
    return sorted(findings)
