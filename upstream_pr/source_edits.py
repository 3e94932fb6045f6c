"""
Edits of Python source text located with `ast`: a method is found by name, and its exact line span (decorators
included) is replaced or removed, or a new method follows another. Everything around it is left byte for byte.
"""

import ast
from dataclasses import dataclass


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _indented(source: str, indent: str) -> list[str]:
    return [indent + line if line.strip() else line for line in _lines(source.rstrip("\n") + "\n")]


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
class RemoveMethod:
    """
    Removes `class_name.method_name` (decorators included, and the blank line that separated it from the next); a
    class left with no body gets `pass`.
    """

    class_name: str
    method_name: str

    def apply(self, text: str) -> str:
        _, lines, start, end, indent = _located_method(text, self.class_name, self.method_name)
        if len(find_class(ast.parse(text), self.class_name).body) == 1:
            return "".join([*lines[:start], f"{indent}pass\n", *lines[end:]])
        if end < len(lines) and not lines[end].strip():
            end += 1
        elif start > 0 and not lines[start - 1].strip():
            # The class's last member: the blank line before it goes instead
            start -= 1
        return "".join([*lines[:start], *lines[end:]])


@dataclass(frozen=True)
class AddFunction:
    """Adds `source` (a module-level function written at column 0) after the module-level function `after`."""

    name: str
    source: str
    after: str

    @property
    def method_name(self) -> str:
        return self.name

    def apply(self, text: str) -> str:
        module = ast.parse(text)
        if find_function(module.body, self.name) is not None:
            raise LookupError(f"function {self.name} is already defined here")
        following = find_function(module.body, self.after)
        if following is None:
            raise LookupError(f"function {self.after} is not defined here")
        lines = _lines(text)
        end = following.end_lineno
        return "".join([*lines[:end], "\n", "\n", *_indented(self.source, ""), *lines[end:]])


@dataclass(frozen=True)
class ReplaceFunction:
    """Replaces the module-level function `name` (decorators included) by `source`, written at column 0."""

    name: str
    source: str

    @property
    def method_name(self) -> str:
        return self.name

    def apply(self, text: str) -> str:
        function = find_function(ast.parse(text).body, self.name)
        if function is None:
            raise LookupError(f"function {self.name} is not defined here")
        lines = _lines(text)
        start, end = _span(function)
        return "".join([*lines[:start], *_indented(self.source, ""), *lines[end:]])


@dataclass(frozen=True)
class AddDecorator:
    """Puts `@decorator` on `class_name.method_name`, outermost (above its other decorators)."""

    class_name: str
    method_name: str
    decorator: str

    def apply(self, text: str) -> str:
        _, lines, start, _, indent = _located_method(text, self.class_name, self.method_name)
        return "".join([*lines[:start], f"{indent}@{self.decorator}\n", *lines[start:]])


@dataclass(frozen=True)
class ReplaceLines:
    """Replaces `old` (whole lines, which must occur exactly once) by `new`: an import, or a class put before another."""

    old: str
    new: str

    def apply(self, text: str) -> str:
        if ("\n" + text).count("\n" + self.old) != 1 or not self.old.endswith("\n"):
            raise LookupError(f"{self.old!r} is not one whole line or block of lines here")
        return ("\n" + text).replace("\n" + self.old, "\n" + self.new)[1:]
