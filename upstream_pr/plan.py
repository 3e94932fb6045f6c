"""
What an upstream pull request changes in a transformers source tree, read from `modeling_overrides/`.

The plan is made for the tree it is given, by reading it, and covers what the run-time patches cover there: both read
`patches/coverage.py` (the tree's era is recognised from its Phi-3 modeling file, as the patches recognise the
installed one). The shared RoPE utilities get the frequency updates of `modeling_overrides/modeling_rope_utils.py`, a
new `rope_cache_utils.py` is `modeling_overrides/rope_cache_utils.py`, and every covered model gets the decorators on
its decoder's and causal LM's `forward` and the checked `prepare_inputs_for_generation` (in its modeling file, and in
its modular file where that defines them), and, for PhiMoE, its rotary `forward`. A scope (`"phi3"`) keeps the models
of one `pull_request_family`: the minimal pull request.
"""

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from modeling_overrides import modeling_rope_utils, rope_cache_utils
from patches import versions
from patches.coverage import (
    CONTINUOUS_BATCHING_FROM,
    CONTINUOUS_BATCHING_METHODS,
    CONTINUOUS_BATCHING_MODULE,
    LEFT_OUT_MODELS,
    MODEL_CLASS_SUFFIXES,
    MODELS,
    Era,
    UnrecognisedEraError,
    model_exclusion,
    pull_request_models,
    recognise_era,
    rotates_per_row,
)

from .checks import modeling_origins, parent_class, parent_model_prefixes
from .source_edits import (
    AddClass,
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
CONTINUOUS_BATCHING_OVERRIDES = OVERRIDES / "generation" / "continuous_batching.py"
"""Read as text, not imported: it imports the continuous batching of releases that have it (5.23 on)."""
V4_46_SWITCH_WARNING = "you may encounter nonsensical outputs"
"""What the switch warning of Phi-3's causal LM `forward` says (4.45 to 4.47)."""

ROPE_UTILITY_FUNCTIONS = (
    "get_rope_type",
    "get_longrope_switch_point",
    "longrope_uses_long_factors",
    "inverse_frequencies",
    "longrope_frequency_update",
    "dynamic_frequency_update",
    "longrope_forward_per_row",
    "PackedSequenceLengths",
    "packed_sequence_lengths",
    "current_packed_sequence_lengths",
    "_frequency_groups",
    "rope_forward_per_sequence",
    "dynamic_rope_update",
)
"""The functions and classes of `modeling_overrides/modeling_rope_utils.py`, in order: they take
`dynamic_rope_update`'s place."""

ROPE_UTILITY_IMPORTS = (
    ("collections.abc", ("Iterator",)),
    ("contextlib", ("contextmanager",)),
    ("contextvars", ("ContextVar",)),
    ("dataclasses", ("dataclass",)),
    ("functools", ("wraps",)),
    ("typing", ("ClassVar",)),
)
"""The standard-library imports those need (a tree may have some of them already)."""

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
    if isinstance(edit, AddClass):
        return f"`{edit.class_name}`: defined, to decorate its `forward` (the converter expands it)"
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
    """A `forward` the pull request decorates in every covered model: its class suffix, and the decorator."""

    class_suffix: str
    decorator: str


DECODER_FORWARD = _Role("Model", rope_cache_utils.check_rope_cache.__name__)
CAUSAL_LM_FORWARD = _Role("ForCausalLM", rope_cache_utils.split_at_rope_switch.__name__)


def model_coverage(models_dir: Path, release: Version, scope: str = "all") -> tuple[dict[str, str], dict[str, str]]:
    """
    `(covered, left out)`: the models of the tree whose code the pull request of `scope` changes, with their class
    prefixes (those of `scope` that the tree has and the run-time patches cover on its release, `model_exclusion`
    read from the tree's modeling file), and the models it leaves as they are, stale caches included, with why (those
    of `scope` that `model_exclusion` leaves out, and, for every model, those of `LEFT_OUT_MODELS` the tree has).
    """
    covered, left_out = {}, {}
    for name in pull_request_models(scope):
        prefix = MODELS[name].prefix
        path = models_dir / name / f"modeling_{name}.py"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        classes = {node.name: node for node in ast.parse(text).body if isinstance(node, ast.ClassDef)}
        missing = [prefix + suffix for suffix in MODEL_CLASS_SUFFIXES if prefix + suffix not in classes]
        if missing:
            left_out[name] = f"transformers {release} has no {', '.join(missing)}"
            continue
        init = find_function(classes[f"{prefix}RotaryEmbedding"].body, "__init__")
        init_source = _method_text(text, init) if init is not None else ""
        own_caches = [class_name for class_name in classes if class_name.endswith("Cache")]
        reason = model_exclusion(name, str(release), init_source, own_caches)
        if reason is None:
            covered[name] = prefix
        else:
            left_out[name] = reason
    if scope == "all":
        left_out.update({name: why for name, why in LEFT_OUT_MODELS.items() if (models_dir / name).is_dir()})
    return covered, dict(sorted(left_out.items()))


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


def _generation_edit(text: str, class_node: ast.ClassDef, inherits_decorated: bool, batch_wide: bool = False):
    """How a covered causal LM gets the checked `prepare_inputs_for_generation`."""
    checked_generation = _checked_generation_source(batch_wide)
    own = find_function(class_node.body, "prepare_inputs_for_generation")
    if own is None:
        # A modular class inheriting from a covered model's: the converter copies the parent's checked one
        if inherits_decorated:
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
    Whether the file's rotary embedding builds one table for the batch rather than rotating each row by its positions
    (`coverage.rotates_per_row`, as the run-time patches decide): its cache checks then follow the whole batch.
    """
    for class_node in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        forward = find_function(class_node.body, "forward")
        if class_node.name.endswith("RotaryEmbedding") and forward is not None:
            if not rotates_per_row([argument.arg for argument in forward.args.args]):
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


SUPER_KWARGS_FORWARD = """\
@{decorator}
def forward(self, **super_kwargs):
    return super().forward(**super_kwargs)
"""
"""A modular class's `forward` that the converter expands to its parent's, with the decorator on it."""

SUPER_KWARGS_CLASS = """\
class {name}({parent}):
    @{decorator}
    def forward(self, **super_kwargs):
        return super().forward(**super_kwargs)
"""
"""A class a modular file did not define (the converter copied it from the parent model), defined to decorate its
`forward` where the parent model is left out."""


def _implicit_class_edits(tree: ast.Module, origins: dict[str, str], prefix: str, covered: set[str]) -> list:
    """
    For a covered model's modular file: its decoder or causal LM that the file does not define, copied by the
    converter from a model the pull request leaves as it is (a minimal scope), defined with a decorated `forward`.
    """
    edits = []
    defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    parent_prefixes = parent_model_prefixes(tree, origins)
    for role in (DECODER_FORWARD, CAUSAL_LM_FORWARD):
        name = prefix + role.class_suffix
        parent = parent_class(None, origins, parent_prefixes, role.class_suffix)
        if name in defined or parent is None or parent[0] in covered:
            continue
        parent_model, parent_name = parent
        decorator = role.decorator
        source = SUPER_KWARGS_CLASS.format(name=name, parent=parent_name, decorator=decorator)
        edits += [
            AddClass(name, source, before=f"{prefix}ForCausalLM"),
            AddImportFrom(2, f"{parent_model}.modeling_{parent_model}", (parent_name,)),
            AddImportFrom(3, "rope_cache_utils", (decorator,)),
        ]
    return edits


def _parent_model(class_node: ast.ClassDef, origins: dict[str, str], suffix: str) -> str | None:
    """The model a modular class inherits its `suffix` class from (`from ..llama.modeling_llama import ...`)."""
    return next(
        (
            origins[base.id]
            for base in class_node.bases
            if isinstance(base, ast.Name) and base.id.endswith(suffix) and base.id in origins
        ),
        None,
    )


def _decorated_forwards(
    text: str,
    class_node: ast.ClassDef,
    prefix: str,
    batch_wide: bool,
    origins: dict[str, str] | None,
    covered: set[str],
) -> tuple[list, set[str], bool]:
    """
    The decorators a covered model's decoder or causal LM (`class_node`, of the model `prefix`) gets on its `forward`
    and, for the causal LM, its checked `prepare_inputs_for_generation`: `(edits, decorators imported, whether
    `GenerationMixin` is needed)`. In a modular file (`origins`: the other models' classes it imports), a class that
    inherits from a covered model gets nothing it does not define (the converter copies the decorated parent's); one
    that inherits from a model left out gets a `forward` the converter expands, decorated.
    """
    edits, imported, needs_generation_mixin = [], set(), False
    roles = (DECODER_FORWARD, CAUSAL_LM_FORWARD)
    role = next((role for role in roles if class_node.name == prefix + role.class_suffix), None)
    if role is None:
        return edits, imported, needs_generation_mixin
    parent = _parent_model(class_node, origins, role.class_suffix) if origins is not None else None
    inherits_decorated = parent is not None and parent in covered
    decorator = _decorator(role.decorator, batch_wide)
    if find_function(class_node.body, "forward") is not None:
        edits.append(AddDecorator(class_node.name, "forward", decorator))
    elif parent is not None and not inherits_decorated:
        edits.append(AddMethod(class_node.name, "forward", SUPER_KWARGS_FORWARD.format(decorator=decorator), None))
    elif not inherits_decorated:
        raise UnrecognisedTreeError(f"{class_node.name} defines no `forward` here: nothing to decorate")
    if edits:
        imported.add(role.decorator)
    if role is CAUSAL_LM_FORWARD:
        own_generation = find_function(class_node.body, "prepare_inputs_for_generation")
        if edits or (own_generation is not None and drops_cache_at_switch(_method_text(text, own_generation))):
            generation_edit = _generation_edit(text, class_node, inherits_decorated, batch_wide)
            if generation_edit is not None:
                edits.append(generation_edit)
                imported.add("check_rope_cache_in_generation")
                needs_generation_mixin = not isinstance(generation_edit, AddDecorator)
    return edits, imported, needs_generation_mixin


def _phimoe_rotary_edits(class_node: ast.ClassDef, batch_wide: bool) -> list:
    """PhiMoE's rotary `forward`, the only one that does not rotate with the `inv_freq` the update sets (from 5.0),
    or that builds a table for the batch (before): replaced by the one of `modeling_overrides`."""
    if class_node.name != "PhimoeRotaryEmbedding" or find_function(class_node.body, "forward") is None:
        return []
    override_module = "modeling_phimoe_v4_57.py" if batch_wide else "modeling_phimoe.py"
    override = member_source(OVERRIDES / "models" / "phimoe" / override_module, class_node.name, "forward")
    imported = (
        ("get_longrope_switch_point",) if batch_wide else ("current_packed_sequence_lengths", "dynamic_rope_update")
    )
    return [ReplaceMethod(class_node.name, "forward", override), AddImportFrom(3, "modeling_rope_utils", imported)]


def _model_file_plan(
    path: Path,
    relative: str,
    prefix: str | None,
    covered: set[str],
    standard_dynamic_update: str | None = None,
    phi3_v4_46: bool = False,
) -> FilePlan | None:
    """
    The edits of a modeling or modular file. The decorators and the checked `prepare_inputs_for_generation` go only to
    a model the run-time patches cover (`prefix`, its class prefix; `None` for any other model). In a modular file
    they go on the methods it defines; the converter copies the others from their parent.
    `standard_dynamic_update` is set for trees whose rotary embeddings update their own frequencies (before 4.51):
    their updates move to `dynamic_rope_update` (see `_rotary_update_edits`). `phi3_v4_46` is set for the era whose
    Phi-3 code `modeling_phi3_v4_46.py` replaces.
    """
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    origins = modeling_origins(tree) if path.name.startswith("modular_") else None
    batch_wide = _rotates_batch_wide(tree)
    edits, imported, needs_generation_mixin = [], set(), False
    for class_node in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        if standard_dynamic_update is not None and class_node.name.endswith("RotaryEmbedding"):
            rotary_edits = _rotary_update_edits(text, class_node, standard_dynamic_update)
            if rotary_edits:
                edits += rotary_edits
                edits.append(AddImportFrom(3, "modeling_rope_utils", ("dynamic_rope_update",)))
        if phi3_v4_46 and path.name == "modeling_phi3.py":
            edits += _phi3_v4_46_edits(class_node, text)
        if prefix is not None:
            class_edits, class_imports, class_needs_mixin = _decorated_forwards(
                text, class_node, prefix, batch_wide, origins, covered
            )
            edits += class_edits
            imported |= class_imports
            needs_generation_mixin |= class_needs_mixin
            edits += _phimoe_rotary_edits(class_node, batch_wide)
    if prefix is not None and origins is not None:
        edits += _implicit_class_edits(tree, origins, prefix, covered)
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
    clashes = [
        name
        for name in ROPE_UTILITY_FUNCTIONS[:-1]
        if find_function(module.body, name) is not None or find_class(module, name) is not None
    ]
    has_decorator = find_function(module.body, "dynamic_rope_update") is not None
    if clashes or not (has_decorator or assigned_at_module_level(module, "ROPE_INIT_FUNCTIONS")):
        raise UnrecognisedTreeError(
            f"{relative} does not have the shape the diff is made for: expected `dynamic_rope_update` or "
            f"`ROPE_INIT_FUNCTIONS`, and none of {list(ROPE_UTILITY_FUNCTIONS[:-1])}; found clashes {clashes}"
        )
    sources = tuple(function_source(getattr(modeling_rope_utils, name)) for name in ROPE_UTILITY_FUNCTIONS)
    imports = [AddImportFrom(0, module_name, names) for module_name, names in ROPE_UTILITY_IMPORTS]
    imports.append(AddImportFrom(1, "utils", ("is_torchdynamo_compiling",)))
    if has_decorator:
        return FilePlan(relative, [ReplaceFunction("dynamic_rope_update", sources), *imports])
    return FilePlan(relative, [InsertAfterStatement("ROPE_INIT_FUNCTIONS", sources), *imports])


def _relative_module(target: str, package: str) -> str:
    """How a module of `package` (dotted, inside `transformers`; `""` for the top) imports `target` relatively."""
    package_parts, target_parts = package.split(".") if package else [], target.split(".")
    common = 0
    while (
        common < len(package_parts)
        and common < len(target_parts) - 1
        and package_parts[common] == target_parts[common]
    ):
        common += 1
    return "." * (len(package_parts) - common + 1) + ".".join(target_parts[common:])


def _rope_cache_module_text(release: Version) -> str:
    """`modeling_overrides/rope_cache_utils.py` as `src/transformers/rope_cache_utils.py`."""
    return _transplanted_module_text(Path(rope_cache_utils.__file__), "", "", release)


def _transplanted_module_text(path: Path, overrides_package: str, package: str, release: Version) -> str:
    """
    A module of `modeling_overrides/` (`path`, in its package `overrides_package`) as a module of transformers'
    `package`: its imports of transformers and of `modeling_overrides` (which mirrors transformers' layout) made
    relative, and for 4.x releases (which still run on Python 3.9) annotations postponed, as PEP 604 unions need.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    module = ast.parse(text)
    imports = [node for node in module.body if isinstance(node, ast.ImportFrom)]
    relative_imports = []
    for node in imports:
        if node.module and (node.level > 0 or node.module.split(".")[0] == "transformers"):
            if node.level == 0:
                target = node.module.removeprefix("transformers.")
            else:
                base = overrides_package.split(".")[: len(overrides_package.split(".")) - (node.level - 1)]
                target = ".".join([part for part in base if part] + [node.module])
            module_name = _relative_module(target, package)
            statement = "".join(lines[node.lineno - 1 : node.end_lineno])
            statement = re.sub(r"^from \S+ import", f"from {module_name} import", statement)
            # isort's order of relative imports: the furthest first
            sort_key = (-(len(module_name) - len(module_name.lstrip("."))), module_name.lstrip("."))
            relative_imports.append((sort_key, node.lineno - 1, node.end_lineno, statement))
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


def _tree_era(models_dir: Path, release: Version) -> Era:
    """The era of the tree's code, recognised from its Phi-3 modeling file as the run-time patches recognise it."""
    try:
        return recognise_era((models_dir / "phi3" / "modeling_phi3.py").read_text(encoding="utf-8"), str(release))
    except (OSError, UnrecognisedEraError) as error:
        raise UnrecognisedTreeError(str(error)) from error


def _check_every_covered_model_is_decorated(plans: list[FilePlan], covered: dict[str, str]) -> None:
    """Each covered model's decoder and causal LM `forward` are decorated in its modeling file: none partly."""
    decorated = {
        (plan.path.rsplit("/", 1)[-1], edit.class_name)
        for plan in plans
        for edit in plan.edits
        if isinstance(edit, AddDecorator) and edit.method_name == "forward"
    }
    missing = [
        f"{prefix}{role.class_suffix}"
        for name, prefix in covered.items()
        for role in (DECODER_FORWARD, CAUSAL_LM_FORWARD)
        if (f"modeling_{name}.py", f"{prefix}{role.class_suffix}") not in decorated
    ]
    if missing:
        raise UnrecognisedTreeError(f"the covered forward passes of {missing} are not decorated")


def _continuous_batching_plans(tree: Path, release: Version) -> list[FilePlan]:
    """
    Continuous batching, from `CONTINUOUS_BATCHING_FROM`: `modeling_overrides/generation/continuous_batching.py` as a
    new module (`CONTINUOUS_BATCHING_MODULE`), and its decorators on the methods of `CONTINUOUS_BATCHING_METHODS`,
    each checked as the run-time patches check it (its parameters).
    """
    if release.release[:2] < tuple(int(part) for part in CONTINUOUS_BATCHING_FROM.split(".")):
        return []
    package, _, module_name = CONTINUOUS_BATCHING_MODULE.rpartition(".")
    directory = tree / "src" / "transformers" / Path(*package.split("."))
    new_module = FilePlan(
        str((directory / f"{module_name}.py").relative_to(tree)),
        new_text=_transplanted_module_text(CONTINUOUS_BATCHING_OVERRIDES, "generation", package, release),
    )
    edits_by_module = {}
    for method in CONTINUOUS_BATCHING_METHODS:
        class_node = find_class(
            ast.parse((directory / f"{method.module}.py").read_text(encoding="utf-8")), method.owner
        )
        function = find_function(class_node.body, method.method) if class_node is not None else None
        found = [argument.arg for argument in function.args.args] if function is not None else None
        if found is None or found[: len(method.parameters)] != list(method.parameters):
            raise UnrecognisedTreeError(
                f"{method.owner}.{method.method} in {method.module}.py is not the one the diff decorates (parameters "
                f"{found}, expected to start with {list(method.parameters)})"
            )
        edits = edits_by_module.setdefault(method.module, [])
        edits += [
            AddDecorator(method.owner, method.method, method.decorator),
            AddImportFrom(1, module_name, (method.decorator,)),
        ]
    plans = [
        FilePlan(str((directory / f"{module}.py").relative_to(tree)), edits)
        for module, edits in edits_by_module.items()
    ]
    return [new_module, *plans]


def make_plan(tree: Path, scope: str = "all") -> list[FilePlan]:
    """
    The files a pull request changes in the transformers source tree `tree`, and how. `scope` is `"all"`, every model
    the run-time patches cover, or a `pull_request_family` of `patches.coverage.MODELS` (`"phi3"`: the minimal pull
    request, the Phi-3 family's files with the shared RoPE update and the new module).

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
    era = _tree_era(models_dir, release)
    standard_dynamic_update = _standard_dynamic_update(models_dir) if era.models_update_their_own_frequencies else None
    covered, _ = model_coverage(models_dir, release, scope)
    in_scope = set(pull_request_models(scope))
    plans = [
        _rope_utils_plan(tree),
        FilePlan("src/transformers/rope_cache_utils.py", new_text=_rope_cache_module_text(release)),
    ]
    for path in _model_files(models_dir):
        if scope != "all" and path.parent.name not in in_scope:
            continue
        plan = _model_file_plan(
            path,
            str(path.relative_to(tree)),
            covered.get(path.parent.name),
            set(covered),
            standard_dynamic_update,
            phi3_v4_46=era.phi3_rotary_override == "modeling_phi3_v4_46",
        )
        if plan is not None:
            plans.append(plan)
    _check_every_covered_model_is_decorated(plans, covered)
    if scope == "all":
        plans += _continuous_batching_plans(tree, release)
    return plans
