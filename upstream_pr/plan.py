"""
What an upstream pull request changes in a transformers source tree, read from `modeling_overrides/`.

The plan is made for the tree it is given, by reading it: the shared RoPE utilities get the frequency updates of
`modeling_overrides/modeling_rope_utils.py`, a new `rope_cache_utils.py` is `modeling_overrides/rope_cache_utils.py`,
and every model class that carries a copy of a decoder or causal LM `forward` of the covered models (in its modeling
file, and in its modular file where that defines it) gets the decorators, the checked `prepare_inputs_for_generation`
and, for PhiMoE, its rotary `forward`. A copy is recognised as upstream's "Copied from" check does: the same source
once the model's name is replaced.
"""

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from modeling_overrides import modeling_rope_utils, rope_cache_utils
from patches import versions
from patches.targets import STANDARD_ROPE_MODELS, standard_rope_model_exclusion

from .source_edits import (
    AddDecorator,
    AddImportFrom,
    AddMethod,
    InsertAfterStatement,
    MoveFrequencyUpdateToDecorator,
    RemoveMethod,
    RemoveUnusedImport,
    ReplaceFunction,
    ReplaceMethod,
    assigned_at_module_level,
    find_class,
    find_function,
    function_source,
    is_frequency_update_statement,
)


OVERRIDES = Path(modeling_rope_utils.__file__).parent
SUPPORTED_RELEASES = versions.supported_specifier()
"""Releases whose trees the diff is made for, those the run-time patches support (`patches/requirements.txt`); a
checkout of upstream's main, a development version of the next minor, is accepted too (see `is_supported_tree`). From 4.51 the rotary embeddings'
frequencies are updated by the `dynamic_rope_update` decorator, which the diff replaces; before, by
`_dynamic_frequency_update` methods of their own (and Phi-3's `_longrope_frequency_update` from 4.48), which the diff
moves to that decorator, as 4.51 did. Before 4.48 Phi-3 rotates with a per-layer `Phi3LongRoPEScaledRotaryEmbedding`,
and from 4.45 its causal LM warns at the switch: both get the code of
`modeling_overrides/models/phi3/modeling_phi3_v4_46.py` (see `patches/targets.py`)."""

PHI3_V4_46 = OVERRIDES / "models" / "phi3" / "modeling_phi3_v4_46.py"
V4_46_SWITCH_WARNING = "you may encounter nonsensical outputs"
"""What the switch warning of Phi-3's causal LM `forward` says (4.45 to 4.47)."""

COVERED_MODELS = {
    "phi3": "Phi3",
    "phimoe": "Phimoe",
    "phi4_multimodal": "Phi4Multimodal",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
}
"""The models whose decoder and causal LM `forward` define the copies: the Phi models, and Llama, Mistral and Qwen2
(`patches/targets.py`). A copy is changed where it stands in a model the run-time patches cover (`_covered_models`):
one of these, or of `patches.targets.STANDARD_ROPE_MODELS`."""

ROPE_UTILITY_FUNCTIONS = (
    "get_rope_type",
    "get_longrope_switch_point",
    "longrope_uses_long_factors",
    "inverse_frequencies",
    "longrope_frequency_update",
    "dynamic_frequency_update",
    "longrope_forward_per_row",
    "dynamic_rope_update",
)
"""The functions of `modeling_overrides/modeling_rope_utils.py`, in order: they take `dynamic_rope_update`'s place."""

CACHE_DROP_MARKERS = (r"^\s*(past_key_values|cache) = None$", r"original_max_position_embeddings")
"""What upstream's `prepare_inputs_for_generation` override that drops the cache at the longrope switch contains (each
a regular expression, matched line by line): the drop, of `past_key_values` or, from 5.24, where the argument is
named `cache`, of `cache`, and the switch point."""


def drops_cache_at_switch(source: str) -> bool:
    """Whether `source` (a `prepare_inputs_for_generation`) is upstream's drop of the cache at the longrope switch."""
    return all(re.search(marker, source, flags=re.MULTILINE) for marker in CACHE_DROP_MARKERS)


class UnrecognisedTreeError(ValueError):
    """The tree is not a transformers source tree of a release the diff is made for."""


@dataclass
class FilePlan:
    """The edits of one file (applied in order), or the whole text of a new file."""

    path: str
    edits: list = field(default_factory=list)
    new_text: str | None = None

    def describe(self) -> list[str]:
        if self.new_text is not None:
            return ["new file"]
        return [
            _describe_edit(edit) for edit in self.edits if not isinstance(edit, (AddImportFrom, RemoveUnusedImport))
        ]


def _describe_edit(edit) -> str:
    if isinstance(edit, AddDecorator):
        return f"`{edit.class_name}.{edit.method_name}`: `@{edit.decorator}`"
    if isinstance(edit, ReplaceFunction):
        return f"`{edit.name}` and the frequency updates it calls"
    if isinstance(edit, InsertAfterStatement):
        return "`dynamic_rope_update` and the frequency updates it calls: new"
    if isinstance(edit, MoveFrequencyUpdateToDecorator):
        return f"`{edit.class_name}.forward`: its frequency update moves to `@{edit.decorator}`"
    if isinstance(edit, RemoveMethod):
        return f"`{edit.class_name}.{edit.method_name}`: removed (now in `modeling_rope_utils`)"
    if isinstance(edit, AddMethod):
        return f"`{edit.class_name}.{edit.method_name}`: checked generic version"
    return f"`{edit.class_name}.{edit.method_name}`: replaced"


def is_supported_tree(release: Version) -> bool:
    """A release of `SUPPORTED_RELEASES`, or a development version of the minor after the newest tested one (main)."""
    if Version(release.base_version) in SUPPORTED_RELEASES:
        return True
    newest = Version(versions.NEWEST_TESTED_VERSION)
    return release.is_prerelease and release.release[:2] == (newest.major, newest.minor + 1)


def read_release(tree: Path) -> Version:
    """The transformers release of a source tree in the upstream layout (`src/transformers/__init__.py`)."""
    init = tree / "src" / "transformers" / "__init__.py"
    if not init.is_file():
        raise UnrecognisedTreeError(
            f"{tree} is not a transformers source tree: {init.relative_to(tree)} is missing (expected the upstream "
            "layout, `src/transformers/...` and `tests/...`)"
        )
    match = re.search(r'^__version__ = "([^"]+)"', init.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if match is None:
        raise UnrecognisedTreeError(f"{init} does not set `__version__`")
    return Version(match.group(1))


def member_source(path: Path, class_name: str, member_name: str) -> str:
    """
    The source of a class member in a file of `modeling_overrides/` (a method with its decorators, or an attribute
    with the comment lines just above it), dedented to column 0.
    """
    text = path.read_text(encoding="utf-8")
    class_node = find_class(ast.parse(text), class_name)
    member = next(
        node
        for node in class_node.body
        if (isinstance(node, ast.FunctionDef) and node.name == member_name)
        or (
            isinstance(node, ast.Assign) and any(getattr(target, "id", None) == member_name for target in node.targets)
        )
    )
    lines = text.splitlines(keepends=True)
    start = min([member.lineno, *(decorator.lineno for decorator in getattr(member, "decorator_list", []))]) - 1
    while start > 0 and lines[start - 1].strip().startswith("#"):
        start -= 1
    source = "".join(lines[start : member.end_lineno])
    indent = len(lines[start]) - len(lines[start].lstrip())
    return "".join(line[indent:] if line.strip() else line for line in source.splitlines(keepends=True))


def _method_text(text: str, node: ast.FunctionDef) -> str:
    lines = text.splitlines(keepends=True)
    start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)]) - 1
    return "".join(lines[start : node.end_lineno])


def normalized(source: str, model_prefix: str) -> str:
    """`source` with the model's name replaced, as upstream's copy checks compare code."""
    for name in (model_prefix, model_prefix.lower(), model_prefix.upper()):
        source = source.replace(name, "<model>")
    return source


def _model_prefix(class_name: str, suffix: str) -> str | None:
    return class_name[: -len(suffix)] if class_name.endswith(suffix) and len(class_name) > len(suffix) else None


@dataclass(frozen=True)
class _Role:
    """A method the pull request changes wherever a copy of it stands: the class suffix, and the decorator it gets."""

    class_suffix: str
    decorator: str


DECODER_FORWARD = _Role("Model", rope_cache_utils.check_rope_cache.__name__)
CAUSAL_LM_FORWARD = _Role("ForCausalLM", rope_cache_utils.split_at_rope_switch.__name__)


def _reference_forwards(models_dir: Path, role: _Role) -> set[str]:
    """The normalized `forward` of `role`'s class in each covered model: what a copy looks like."""
    references = set()
    for module_name, prefix in COVERED_MODELS.items():
        path = models_dir / module_name / f"modeling_{module_name}.py"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        class_node = find_class(ast.parse(text), prefix + role.class_suffix)
        forward = find_function(class_node.body, "forward") if class_node is not None else None
        if forward is not None:
            references.add(normalized(_method_text(text, forward), prefix))
    return references


def _covered_models(models_dir: Path, release: Version) -> set[str]:
    """
    The models of the tree whose copies the pull request changes: those of `COVERED_MODELS`, and those of
    `STANDARD_ROPE_MODELS` that the run-time patches cover on the tree's release (`standard_rope_model_exclusion`, read
    from the tree's modeling file). A model the patches leave out keeps its code, stale cache included.
    """
    covered = {name for name in COVERED_MODELS if (models_dir / name).is_dir()}
    for name, prefix in STANDARD_ROPE_MODELS.items():
        path = models_dir / name / f"modeling_{name}.py"
        if name in covered or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        if not all(f"{prefix}{suffix}" in classes for suffix in ("RotaryEmbedding", "Model", "ForCausalLM")):
            continue
        init = find_function(classes[f"{prefix}RotaryEmbedding"].body, "__init__")
        init_source = _method_text(text, init) if init is not None else ""
        own_caches = [class_name for class_name in classes if class_name.endswith("Cache")]
        if standard_rope_model_exclusion(name, str(release), init_source, own_caches) is None:
            covered.add(name)
    return covered


def _model_files(models_dir: Path) -> list[Path]:
    files = []
    for model_dir in sorted(path for path in models_dir.iterdir() if path.is_dir()):
        for kind in ("modeling", "modular"):
            path = model_dir / f"{kind}_{model_dir.name}.py"
            if path.is_file():
                files.append(path)
    return files


def _checked_generation_source(batch_wide: bool) -> str:
    if batch_wide:
        path, class_name = OVERRIDES / "models" / "phimoe" / "modeling_phimoe_v4_57.py", "PhimoeForCausalLM"
    else:
        path, class_name = OVERRIDES / "models" / "llama" / "modeling_llama.py", "LlamaForCausalLM"
    return member_source(path, class_name, "prepare_inputs_for_generation")


def _generation_edit(text: str, class_node: ast.ClassDef, is_modular: bool, batch_wide: bool = False):
    """How a causal LM whose `forward` is a copy gets the checked `prepare_inputs_for_generation`."""
    checked_generation = _checked_generation_source(batch_wide)
    own = find_function(class_node.body, "prepare_inputs_for_generation")
    if own is None:
        # A modular file inherits it from the parent class, which the converter copies with the rest
        if is_modular:
            return None
        return AddMethod(class_node.name, "prepare_inputs_for_generation", checked_generation, after="forward")
    if drops_cache_at_switch(_method_text(text, own)):
        # Upstream's drop of the cache at the switch, which the check replaces on every path
        return ReplaceMethod(class_node.name, "prepare_inputs_for_generation", checked_generation)
    return AddDecorator(
        class_node.name, "prepare_inputs_for_generation", _decorator("check_rope_cache_in_generation", batch_wide)
    )


def _decorator(name: str, batch_wide: bool) -> str:
    return f"{name}(frequencies_per_row=False)" if batch_wide else name


def _rotates_batch_wide(tree: ast.Module) -> bool:
    """
    Whether the file's rotary embedding builds one table for the batch (`forward(x, seq_len)`, without positions:
    PhiMoE before 5.0) rather than rotating each row by its positions: its cache checks then follow the whole batch.
    """
    for class_node in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        forward = find_function(class_node.body, "forward")
        if class_node.name.endswith("RotaryEmbedding") and forward is not None:
            parameters = [argument.arg for argument in forward.args.args]
            if "seq_len" in parameters and "position_ids" not in parameters:
                return True
    return False


FREQUENCY_UPDATE_METHODS = ("_dynamic_frequency_update", "_longrope_frequency_update")
"""The per-class frequency updates of releases before 4.51, which `dynamic_rope_update` replaces."""


def _standard_dynamic_update(models_dir: Path) -> str | None:
    """Llama's `_dynamic_frequency_update`, normalized, in a tree that has one (before 4.51): its copies' text."""
    path = models_dir / "llama" / "modeling_llama.py"
    text = path.read_text(encoding="utf-8")
    class_node = find_class(ast.parse(text), "LlamaRotaryEmbedding")
    update = find_function(class_node.body, "_dynamic_frequency_update") if class_node is not None else None
    return normalized(_method_text(text, update), "Llama") if update is not None else None


def _rotary_update_edits(text: str, class_node: ast.ClassDef, standard_dynamic_update: str) -> list:
    """
    The edits that move a rotary embedding's own frequency update (before 4.51) to `dynamic_rope_update`, or none
    when the class does not have that shape: its `forward` starts with the update, and the update it defines (if any)
    is a copy of Llama's (a variant, such as one passing other arguments to the init function, is left as it is).
    Phi-3's `forward`, which also makes the longrope update, becomes that of `modeling_overrides`.
    """
    forward = find_function(class_node.body, "forward")
    if forward is None or not forward.body or not is_frequency_update_statement(forward.body[0]):
        return []
    prefix = _model_prefix(class_node.name, "RotaryEmbedding")
    own_update = find_function(class_node.body, "_dynamic_frequency_update")
    if own_update is not None and normalized(_method_text(text, own_update), prefix) != standard_dynamic_update:
        return []
    removed = [
        RemoveMethod(class_node.name, name)
        for name in FREQUENCY_UPDATE_METHODS
        if find_function(class_node.body, name) is not None
    ]
    if "_longrope_frequency_update(" in ast.unparse(forward.body[0]):
        override = OVERRIDES / "models" / "phi3" / "modeling_phi3_v4_50.py"
        return [
            ReplaceMethod(class_node.name, "forward", member_source(override, "Phi3RotaryEmbedding", "forward"))
        ] + removed
    return [MoveFrequencyUpdateToDecorator(class_node.name, "dynamic_rope_update"), *removed]


def _code_without_docstring(function: ast.FunctionDef) -> str:
    """The function's code (`ast.dump`, so without comments or layout), its docstring left out (a method's docstring
    is indented with it, so its text depends on where it stands)."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    fields = {field: getattr(function, field) for field in function._fields if field != "body"}
    return ast.dump(ast.FunctionDef(**fields, body=body))


def _phi3_v4_46_edits(class_node: ast.ClassDef, text: str) -> list:
    """
    The Phi-3 methods of 4.44-4.47 that `modeling_phi3_v4_46.py` replaces: the longrope rotary `forward`, and the
    causal LM `forward` that warns at the switch (4.45-4.47). Each must be the method the override was written for (its
    signature and, for the causal LM, its body without the warning), or the tree is refused.
    """
    forward = find_function(class_node.body, "forward")
    if class_node.name == "Phi3LongRoPEScaledRotaryEmbedding" and forward is not None:
        parameters = [argument.arg for argument in forward.args.args]
        source = _method_text(text, forward)
        if parameters != ["self", "x", "position_ids", "seq_len"] or "self.long_factor" not in source:
            raise UnrecognisedTreeError(
                f"Phi3LongRoPEScaledRotaryEmbedding.forward has an unexpected shape (parameters {parameters}); the "
                f"diff replaces the one of {PHI3_V4_46.name} (4.44-4.47)"
            )
        return [ReplaceMethod(class_node.name, "forward", member_source(PHI3_V4_46, class_node.name, "forward"))]
    if (
        class_node.name == "Phi3ForCausalLM"
        and forward is not None
        and V4_46_SWITCH_WARNING in _method_text(text, forward)
    ):
        override = member_source(PHI3_V4_46, class_node.name, "forward")
        without_warning = ast.FunctionDef(
            **{field: getattr(forward, field) for field in forward._fields if field != "body"},
            body=[
                statement
                for statement in forward.body
                if not (isinstance(statement, ast.If) and V4_46_SWITCH_WARNING in ast.unparse(statement))
            ],
        )
        if _code_without_docstring(without_warning) != _code_without_docstring(ast.parse(override).body[0]):
            raise UnrecognisedTreeError(
                f"Phi3ForCausalLM.forward, once its switch warning is left out, is not the one of {PHI3_V4_46.name} "
                "(4.46); the diff replaces only that one"
            )
        return [ReplaceMethod(class_node.name, "forward", override)]
    return []


def _model_file_plan(
    path: Path,
    relative: str,
    references: dict[_Role, set[str]],
    modeling_plan: FilePlan | None = None,
    standard_dynamic_update: str | None = None,
    covered: bool = True,
) -> FilePlan | None:
    """
    The edits of a modeling or modular file. A modular file also gets, on the methods it defines, the decorators its
    generated modeling file got (the converter rewrites code, so the modular copy may not read like the original).
    Those and the checked `prepare_inputs_for_generation` go only to a model the run-time patches cover (`covered`).
    `standard_dynamic_update` is set for trees whose rotary embeddings update their own frequencies (before 4.51):
    their updates move to `dynamic_rope_update` (see `_rotary_update_edits`).
    """
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    is_modular = path.name.startswith("modular_")
    decorated_in_modeling = {
        (edit.class_name, edit.method_name)
        for edit in (modeling_plan.edits if modeling_plan is not None else [])
        if isinstance(edit, AddDecorator) and edit.method_name == "forward"
    }
    batch_wide = _rotates_batch_wide(tree)
    edits, imported, needs_generation_mixin = [], set(), False
    for class_node in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        if standard_dynamic_update is not None and class_node.name.endswith("RotaryEmbedding"):
            rotary_edits = _rotary_update_edits(text, class_node, standard_dynamic_update)
            if rotary_edits:
                edits += rotary_edits
                edits.append(AddImportFrom(3, "modeling_rope_utils", ("dynamic_rope_update",)))
        if path.name == "modeling_phi3.py":
            edits += _phi3_v4_46_edits(class_node, text)
        for role in (DECODER_FORWARD, CAUSAL_LM_FORWARD) if covered else ():
            prefix = _model_prefix(class_node.name, role.class_suffix)
            forward = find_function(class_node.body, "forward")
            if prefix is None or forward is None:
                continue
            is_copy = normalized(_method_text(text, forward), prefix) in references[role]
            if not is_copy and (class_node.name, "forward") not in decorated_in_modeling:
                continue
            edits.append(AddDecorator(class_node.name, "forward", _decorator(role.decorator, batch_wide)))
            imported.add(role.decorator)
            if role is CAUSAL_LM_FORWARD:
                generation_edit = _generation_edit(text, class_node, is_modular, batch_wide)
                if generation_edit is not None:
                    edits.append(generation_edit)
                    imported.add("check_rope_cache_in_generation")
                    needs_generation_mixin |= not isinstance(generation_edit, AddDecorator)
        own_generation = find_function(class_node.body, "prepare_inputs_for_generation")
        if (
            covered
            and own_generation is not None
            and not any(getattr(edit, "class_name", None) == class_node.name for edit in edits)
            and drops_cache_at_switch(_method_text(text, own_generation))
        ):
            # A modular class that inherits its `forward` but defines upstream's drop of the cache
            edits.append(_generation_edit(text, class_node, is_modular, batch_wide))
            imported.add("check_rope_cache_in_generation")
            needs_generation_mixin = True
        if class_node.name == "PhimoeRotaryEmbedding" and find_function(class_node.body, "forward") is not None:
            # The only rotary `forward` that does not rotate with the `inv_freq` the update sets (from 5.0), or that
            # builds a table for the batch (before)
            override_module = "modeling_phimoe_v4_57.py" if batch_wide else "modeling_phimoe.py"
            override = member_source(OVERRIDES / "models" / "phimoe" / override_module, class_node.name, "forward")
            edits.append(ReplaceMethod(class_node.name, "forward", override))
            if not batch_wide:
                edits.append(AddImportFrom(3, "modeling_rope_utils", ("dynamic_rope_update",)))
            else:
                edits.append(AddImportFrom(3, "modeling_rope_utils", ("get_longrope_switch_point",)))
    if not edits:
        return None
    if needs_generation_mixin:
        edits.append(AddImportFrom(3, "generation", ("GenerationMixin",)))
    if imported:
        edits.append(AddImportFrom(3, "rope_cache_utils", tuple(sorted(imported))))
    edits += _imports_left_unused(tree, edits)
    return FilePlan(relative, edits)


def _imports_left_unused(tree: ast.Module, edits: list) -> list:
    """
    The imports that a replaced method may have been the last user of (from 5.24, the `deprecate_kwarg` of PhiMoE's
    `prepare_inputs_for_generation` in its modular file): each goes if nothing uses it once the edits are made.
    """
    imported = {
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    names = set()
    for edit in edits:
        if isinstance(edit, ReplaceMethod):
            class_node = find_class(tree, edit.class_name)
            method = find_function(class_node.body, edit.method_name) if class_node is not None else None
            if method is not None:
                names |= {node.id for node in ast.walk(method) if isinstance(node, ast.Name)} & imported
    return [RemoveUnusedImport(name) for name in sorted(names)]


def _rope_utils_plan(tree: Path) -> FilePlan:
    """
    The frequency updates of `modeling_overrides/modeling_rope_utils.py` in place of `dynamic_rope_update`, or, in a
    release without it (before 4.51), after `ROPE_INIT_FUNCTIONS`, which they use.
    """
    relative = "src/transformers/modeling_rope_utils.py"
    module = ast.parse((tree / relative).read_text(encoding="utf-8"))
    clashes = [name for name in ROPE_UTILITY_FUNCTIONS[:-1] if find_function(module.body, name) is not None]
    has_decorator = find_function(module.body, "dynamic_rope_update") is not None
    if clashes or not (has_decorator or assigned_at_module_level(module, "ROPE_INIT_FUNCTIONS")):
        raise UnrecognisedTreeError(
            f"{relative} does not have the shape the diff is made for: expected `dynamic_rope_update` or "
            f"`ROPE_INIT_FUNCTIONS`, and none of {list(ROPE_UTILITY_FUNCTIONS[:-1])}; found clashes {clashes}"
        )
    sources = tuple(function_source(getattr(modeling_rope_utils, name)) for name in ROPE_UTILITY_FUNCTIONS)
    if has_decorator:
        return FilePlan(relative, [ReplaceFunction("dynamic_rope_update", sources)])
    return FilePlan(
        relative, [InsertAfterStatement("ROPE_INIT_FUNCTIONS", sources), AddImportFrom(0, "functools", ("wraps",))]
    )


def _rope_cache_module_text(release: Version) -> str:
    """
    `modeling_overrides/rope_cache_utils.py` as a module of `src/transformers/`: absolute imports made relative, and
    for 4.x releases (which still run on Python 3.9) annotations postponed, as PEP 604 unions need.
    """
    text = Path(rope_cache_utils.__file__).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    module = ast.parse(text)
    imports = [node for node in module.body if isinstance(node, ast.ImportFrom)]
    relative_imports = []
    for node in imports:
        if node.module and (node.level > 0 or node.module.split(".")[0] == "transformers"):
            module_name = node.module.removeprefix("transformers.") if node.level == 0 else node.module
            statement = "".join(lines[node.lineno - 1 : node.end_lineno])
            statement = re.sub(r"^from \S+ import", f"from .{module_name} import", statement)
            relative_imports.append((module_name, node.lineno - 1, node.end_lineno, statement))
    # The package's own imports become one block of relative ones, in isort's order, where the first stood
    first_line = min(start for _, start, _, _ in relative_imports)
    dropped = {line for _, start, end, _ in relative_imports for line in range(start, end)}
    block = "".join(statement for _, _, _, statement in sorted(relative_imports))
    new_lines = []
    for index, line in enumerate(lines):
        if index == first_line:
            new_lines.append(block)
        if index in dropped:
            continue
        new_lines.append(line)
    # The blank lines the removed sections leave behind collapse to those isort keeps: one between sections, two
    # after the imports
    text = re.sub(r"\n{3,}(from \.)", r"\n\n\1", "".join(new_lines))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    if release.major < 5:
        first_import = min(node.lineno for node in module.body if isinstance(node, (ast.Import, ast.ImportFrom)))
        lines = text.splitlines(keepends=True)
        text = "".join(
            [*lines[: first_import - 1], "from __future__ import annotations\n\n", *lines[first_import - 1 :]]
        )
        text = _unquoted_annotations(text)
    return text


def _unquoted_annotations(text: str) -> str:
    """`text` with its annotations written as strings (forward references) unquoted: postponed annotations make the
    quotes redundant (ruff's UP037)."""
    annotations = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            parameters = [
                *arguments.posonlyargs,
                *arguments.args,
                *arguments.kwonlyargs,
                arguments.vararg,
                arguments.kwarg,
            ]
            annotations += [parameter.annotation for parameter in parameters if parameter is not None]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    quoted = [
        annotation
        for annotation in annotations
        if isinstance(annotation, ast.Constant)
        and isinstance(annotation.value, str)
        and annotation.lineno == annotation.end_lineno
    ]
    lines = text.splitlines(keepends=True)
    # From the last, so that the offsets of those before stay right (`ast` counts them in UTF-8 bytes)
    for annotation in sorted(quoted, key=lambda node: (node.lineno, node.col_offset), reverse=True):
        line = lines[annotation.lineno - 1].encode("utf-8")
        unquoted = line[: annotation.col_offset] + annotation.value.encode("utf-8") + line[annotation.end_col_offset :]
        lines[annotation.lineno - 1] = unquoted.decode("utf-8")
    return "".join(lines)


def make_plan(tree: Path) -> list[FilePlan]:
    """
    The files a pull request changes in the transformers source tree `tree`, and how.

    Raises:
        UnrecognisedTreeError: `tree` is not a transformers source tree of a release in `SUPPORTED_RELEASES`, or its
            code does not have the shape the edits are made for.
    """
    release = read_release(tree)
    if not is_supported_tree(release):
        raise UnrecognisedTreeError(
            f"{tree} holds transformers {release}; the pull-request diff is made for transformers"
            f"{versions.supported_range()} and the development version of the next minor (tested: "
            f"{', '.join(versions.TESTED_VERSIONS)})."
        )
    models_dir = tree / "src" / "transformers" / "models"
    references = {role: _reference_forwards(models_dir, role) for role in (DECODER_FORWARD, CAUSAL_LM_FORWARD)}
    standard_dynamic_update = _standard_dynamic_update(models_dir)
    covered = _covered_models(models_dir, release)
    plans = [
        _rope_utils_plan(tree),
        FilePlan("src/transformers/rope_cache_utils.py", new_text=_rope_cache_module_text(release)),
    ]
    modeling_plans = {}
    for path in _model_files(models_dir):
        modeling_plan = modeling_plans.get(path.parent.name) if path.name.startswith("modular_") else None
        plan = _model_file_plan(
            path,
            str(path.relative_to(tree)),
            references,
            modeling_plan,
            standard_dynamic_update,
            covered=path.parent.name in covered,
        )
        if plan is not None:
            plans.append(plan)
            if path.name.startswith("modeling_"):
                modeling_plans[path.parent.name] = plan
    missing = [
        name
        for name in COVERED_MODELS
        if (models_dir / name).is_dir() and not any(f"/models/{name}/" in plan.path for plan in plans)
    ]
    if missing:
        raise UnrecognisedTreeError(f"no copy of the covered forward passes found for {missing} in {tree}")
    return plans
