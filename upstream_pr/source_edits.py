"""
Edits of Python source text located with `ast`: a function or method is found by name, and its exact line span
(decorators included) is replaced, decorated or followed by new code. Everything around it is left byte for byte.
"""

import ast
import inspect
import textwrap
from dataclasses import dataclass


LINE_LENGTH = 119
"""transformers' ruff line length."""


def function_source(function) -> str:
    """The source of `function` (a function or a method), dedented to column 0, decorators included."""
    return textwrap.dedent(inspect.getsource(function))


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _indented(source: str, indent: str) -> list[str]:
    return [indent + line if line.strip() else line for line in _lines(source.rstrip("\n") + "\n")]


def _top_level_functions(sources: tuple[str, ...]) -> list[str]:
    """The lines of `sources` (functions written at column 0), two blank lines between them, as ruff lays them out."""
    lines = []
    for index, source in enumerate(sources):
        if index:
            lines += ["\n", "\n"]
        lines += _indented(source, "")
    return lines


def find_class(tree: ast.Module, class_name: str) -> ast.ClassDef | None:
    return next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name), None)


def find_function(body: list[ast.stmt], name: str) -> ast.FunctionDef | None:
    return next(
        (node for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name),
        None,
    )


def _span(node: ast.AST) -> tuple[int, int]:
    """0-based `[start, end)` line span of `node`, its decorators included."""
    decorators = getattr(node, "decorator_list", [])
    start = min([node.lineno, *(decorator.lineno for decorator in decorators)]) - 1
    return start, node.end_lineno


def _method(text: str, class_name: str, method_name: str) -> ast.FunctionDef | None:
    class_node = find_class(ast.parse(text), class_name)
    return find_function(class_node.body, method_name) if class_node is not None else None


def _located_method(text: str, class_name: str, method_name: str) -> tuple[ast.FunctionDef, list[str], int, int, str]:
    """`class_name.method_name` in `text`: its node, the text's lines, its `[start, end)` span and its indentation."""
    method = _method(text, class_name, method_name)
    if method is None:
        raise LookupError(f"{class_name}.{method_name} is not defined here")
    lines = _lines(text)
    start, end = _span(method)
    return method, lines, start, end, lines[start][: len(lines[start]) - len(lines[start].lstrip())]


def decorator_names(function: ast.FunctionDef) -> list[str]:
    return [ast.unparse(decorator) for decorator in function.decorator_list]


@dataclass(frozen=True)
class AddDecorator:
    """Puts `@decorator` first (outermost) on `class_name.method_name`."""

    class_name: str
    method_name: str
    decorator: str

    def apply(self, text: str) -> str:
        method, lines, start, _, indent = _located_method(text, self.class_name, self.method_name)
        if self.decorator in decorator_names(method):
            return text
        return "".join([*lines[:start], f"{indent}@{self.decorator}\n", *lines[start:]])


@dataclass(frozen=True)
class ReplaceMethod:
    """
    Replaces `class_name.method_name` (decorators included, and a "Copied from" comment just above) by `source`, a
    method or attribute written at column 0.
    """

    class_name: str
    method_name: str
    source: str

    def apply(self, text: str) -> str:
        _, lines, start, end, indent = _located_method(text, self.class_name, self.method_name)
        if start > 0 and lines[start - 1].strip().startswith("# Copied from"):
            # The replacement is no copy of that method any more
            start -= 1
        return "".join([*lines[:start], *_indented(self.source, indent), *lines[end:]])


@dataclass(frozen=True)
class AddClass:
    """Adds `source` (a class written at column 0) before the class `before`, with ruff's two blank lines after."""

    class_name: str
    source: str
    before: str

    def apply(self, text: str) -> str:
        following = find_class(ast.parse(text), self.before)
        if following is None:
            raise LookupError(f"{self.before} is not defined here")
        lines = _lines(text)
        start = min([following.lineno, *(decorator.lineno for decorator in following.decorator_list)]) - 1
        return "".join([*lines[:start], *_indented(self.source, ""), "\n", "\n", *lines[start:]])


@dataclass(frozen=True)
class AddMethod:
    """
    Adds `source` (a method written at column 0) to `class_name`, after its method `after`, or, with `after=None`,
    at the end of the class (in place of a body that is only `pass`).
    """

    class_name: str
    method_name: str
    source: str
    after: str | None

    def apply(self, text: str) -> str:
        if _method(text, self.class_name, self.method_name) is not None:
            raise LookupError(f"{self.class_name}.{self.method_name} is already defined here")
        if self.after is not None:
            _, lines, _, end, indent = _located_method(text, self.class_name, self.after)
            return "".join([*lines[:end], "\n", *_indented(self.source, indent), *lines[end:]])
        class_node = find_class(ast.parse(text), self.class_name)
        if class_node is None:
            raise LookupError(f"{self.class_name} is not defined here")
        lines = _lines(text)
        last = class_node.body[-1]
        indent = lines[last.lineno - 1][: len(lines[last.lineno - 1]) - len(lines[last.lineno - 1].lstrip())]
        if len(class_node.body) == 1 and isinstance(last, ast.Pass):
            return "".join([*lines[: last.lineno - 1], *_indented(self.source, indent), *lines[last.end_lineno :]])
        return "".join([*lines[: last.end_lineno], "\n", *_indented(self.source, indent), *lines[last.end_lineno :]])


@dataclass(frozen=True)
class ReplaceFunction:
    """Replaces the module-level function `name` by `sources` (functions written at column 0), in that order."""

    name: str
    sources: tuple[str, ...]

    @property
    def method_name(self) -> str:
        return self.name

    def apply(self, text: str) -> str:
        function = find_function(ast.parse(text).body, self.name)
        if function is None:
            raise LookupError(f"function {self.name} is not defined here")
        lines = _lines(text)
        start, end = _span(function)
        return "".join([*lines[:start], *_top_level_functions(self.sources), *lines[end:]])


@dataclass(frozen=True)
class RemoveMethod:
    """Removes `class_name.method_name` (decorators included, and the blank line that separated it from the next)."""

    class_name: str
    method_name: str

    def apply(self, text: str) -> str:
        _, lines, start, end, _ = _located_method(text, self.class_name, self.method_name)
        if end < len(lines) and not lines[end].strip():
            end += 1
        elif start > 0 and not lines[start - 1].strip():
            # The class's last member: the blank line before it goes instead
            start -= 1
        return "".join([*lines[:start], *lines[end:]])


@dataclass(frozen=True)
class MoveFrequencyUpdateToDecorator:
    """
    In `class_name.forward`, a rotary embedding's forward pass, replaces the leading `if "dynamic" in
    self.rope_type: self._dynamic_frequency_update(...)` statement (with its `elif` branches) by the decorator
    `@<decorator>`, placed under the existing decorators: the shape upstream's rotary embeddings took in 4.51.
    """

    class_name: str
    decorator: str

    @property
    def method_name(self) -> str:
        return "forward"

    def apply(self, text: str) -> str:
        method, lines, start, _, indent = _located_method(text, self.class_name, "forward")
        update = method.body[0]
        if not is_frequency_update_statement(update):
            raise LookupError(f"{self.class_name}.forward does not start with a frequency update")
        update_start, update_end = update.lineno - 1, update.end_lineno
        if update_end < len(lines) and not lines[update_end].strip():
            update_end += 1
        definition = method.lineno - 1
        return "".join(
            [
                *lines[:definition],
                f"{indent}@{self.decorator}\n",
                *lines[definition:update_start],
                *lines[update_end:],
            ]
        )


def is_frequency_update_statement(statement: ast.stmt) -> bool:
    """Whether `statement` is `if "dynamic" in self.rope_type: self._dynamic_frequency_update(...)` (and `elif`s)."""
    return (
        isinstance(statement, ast.If)
        and ast.unparse(statement.test) == "'dynamic' in self.rope_type"
        and "_dynamic_frequency_update(" in ast.unparse(statement)
    )


def assigned_at_module_level(tree: ast.Module, name: str) -> ast.Assign | ast.AnnAssign | None:
    """The module-level statement that assigns `name` (annotated or not), if any."""
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(getattr(target, "id", None) == name for target in targets):
            return node
    return None


@dataclass(frozen=True)
class InsertAfterStatement:
    """Inserts `sources` (functions written at column 0) after the module-level assignment to `name`."""

    name: str
    sources: tuple[str, ...]

    @property
    def method_name(self) -> str:
        return self.name

    def apply(self, text: str) -> str:
        assignment = assigned_at_module_level(ast.parse(text), self.name)
        if assignment is None:
            raise LookupError(f"no module-level assignment to {self.name} here")
        lines = _lines(text)
        end = assignment.end_lineno
        return "".join([*lines[:end], "\n", "\n", *_top_level_functions(self.sources), *lines[end:]])


def _isort_key(name: str) -> tuple[int, str]:
    """isort's order of imported names (ruff's `order-by-type`): constants, then classes, then the rest."""
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[0].isupper() else 2
    return kind, name


@dataclass(frozen=True)
class AddImportFrom:
    """
    Adds `from <dots><module> import <names>` to the module's top-level imports, where isort puts it: among the
    `from` imports of the same relative level (0: absolute), in alphabetical order of the module (a new line; an
    existing import of that module gets the names added).
    """

    level: int
    module: str
    names: tuple[str, ...]

    def apply(self, text: str) -> str:
        tree = ast.parse(text)
        lines = _lines(text)
        same_level = [
            node for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == self.level and node.module
        ]
        existing = next((node for node in same_level if node.module == self.module), None)
        names = set(self.names)
        if existing is not None:
            names |= {alias.name for alias in existing.names}
            if len(names) == len(existing.names):
                return text
            start, end = existing.lineno - 1, existing.end_lineno
        else:
            following = [node for node in same_level if node.module.lower() > self.module.lower()]
            if following:
                start = end = following[0].lineno - 1
            elif same_level:
                start = end = same_level[-1].end_lineno
            else:
                raise LookupError(
                    f"no top-level `from` import of relative level {self.level} to place the new one among"
                )
        names = sorted(names, key=_isort_key)
        statement = f"from {'.' * self.level}{self.module} import {', '.join(names)}\n"
        if len(statement) > LINE_LENGTH + 1:
            # As ruff formats an import too long for one line: one name a line, a trailing comma
            listed = "".join(f"    {name},\n" for name in names)
            statement = f"from {'.' * self.level}{self.module} import (\n{listed})\n"
        return "".join([*lines[:start], statement, *lines[end:]])


@dataclass(frozen=True)
class RemoveUnusedImport:
    """
    Removes `name` from the module's top-level `from ... import` once nothing in the module uses it any more (after
    an edit took away its last use), as ruff's F401 asks: the whole statement when it imported only that name, else
    the statement without it, on one line. Left as it is while the name is used, or where it is not imported so.
    """

    name: str

    def apply(self, text: str) -> str:
        tree = ast.parse(text)
        if any(isinstance(node, ast.Name) and node.id == self.name for node in ast.walk(tree)):
            return text
        statement = next(
            (
                node
                for node in tree.body
                if isinstance(node, ast.ImportFrom)
                and any((alias.asname or alias.name) == self.name for alias in node.names)
            ),
            None,
        )
        if statement is None:
            return text
        lines = _lines(text)
        kept = [alias for alias in statement.names if (alias.asname or alias.name) != self.name]
        replacement = []
        if kept:
            names = ", ".join(ast.unparse(alias) for alias in kept)
            replacement = [f"from {'.' * statement.level}{statement.module or ''} import {names}\n"]
        return "".join([*lines[: statement.lineno - 1], *replacement, *lines[statement.end_lineno :]])
