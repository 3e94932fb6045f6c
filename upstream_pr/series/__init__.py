"""
The upstream pull requests, as a series in dependency order: pull request n applies on top of pull requests 1 to n-1.

Each pull request is a row of `SERIES`: the members it replaces, adds or removes in transformers' files (their new
code is read from `modeling_overrides/`, the upstream code as it stands once the pull request is merged), and the test
module it adds. Every member it replaces or removes is pinned by the hash of its source on the tree the series was
written against, so that a tree where upstream changed it is refused by name rather than patched blindly.
"""

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..source_edits import (
    AddDecorator,
    AddFunction,
    AddMethod,
    RemoveMethod,
    ReplaceFunction,
    ReplaceLines,
    ReplaceMethod,
    find_class,
    find_function,
)


OVERRIDES = Path(__file__).parents[2] / "modeling_overrides"
TEST_MODULES = Path(__file__).parent / "tests"


def member_source(text: str, class_name: str | None, name: str) -> str | None:
    """
    The source of `class_name.name` in `text` (decorators included, at its indentation), or of the module-level
    function `name` when `class_name` is `None`; `None` when it is not defined.
    """
    module = ast.parse(text)
    class_node = find_class(module, class_name) if class_name is not None else module
    member = find_function(class_node.body, name) if class_node is not None else None
    if member is None:
        return None
    lines = text.splitlines(keepends=True)
    start = min([member.lineno, *(decorator.lineno for decorator in member.decorator_list)]) - 1
    return "".join(lines[start : member.end_lineno])


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def override_source(relative_path: str, class_name: str, name: str) -> str:
    """`class_name.name` of `modeling_overrides/<relative_path>`, dedented to column 0 as `ReplaceMethod` takes it."""
    source = member_source((OVERRIDES / relative_path).read_text(encoding="utf-8"), class_name, name)
    if source is None:
        raise LookupError(f"modeling_overrides/{relative_path} defines no {class_name}.{name}")
    return "".join(line[4:] if line.strip() else line for line in source.splitlines(keepends=True))


@dataclass(frozen=True)
class MemberEdit:
    """
    One edit of a class member in `path` (a file under `src/transformers/`): `edit` is a `source_edits` edit;
    `expected_hash` is the hash of the member's source before it (`None` for a member the edit adds, which must not
    exist yet).
    """

    path: str
    edit: ReplaceMethod | ReplaceFunction | AddMethod | AddFunction | AddDecorator | RemoveMethod | ReplaceLines
    expected_hash: str | None = None

    @property
    def class_name(self) -> str | None:
        """The class of the edited member, `None` for a module-level function."""
        return getattr(self.edit, "class_name", None)

    @property
    def member(self) -> str:
        if not hasattr(self.edit, "method_name"):
            return ""
        return f"{self.class_name}.{self.edit.method_name}" if self.class_name else self.edit.method_name


@dataclass(frozen=True)
class TestModule:
    """
    The tests a pull request adds: `module` (a file of `upstream_pr/series/tests/`), merged into `checkout_path` when
    the tree has that file (a checkout of upstream), else written as `new_path`, a file upstream does not have.
    """

    module: str
    checkout_path: str
    new_path: str

    @property
    def text(self) -> str:
        return (TEST_MODULES / self.module).read_text(encoding="utf-8")


@dataclass(frozen=True)
class PullRequest:
    """
    One pull request of the series. `regression_guards` are the tests (`Class::test_name` prefixes) that pass before
    it: they guard what it removes or keeps. Every other test it adds fails before it (checked by `--verify`).
    """

    slug: str
    title: str
    edits: tuple[MemberEdit, ...]
    tests: TestModule
    regression_guards: tuple[str, ...]
    description: str
    """A file of `upstream_pr/series/descriptions/`: the pull request's text, in upstream's template."""


def override_function(relative_path: str, name: str) -> str:
    """The module-level function `name` of `modeling_overrides/<relative_path>`."""
    text = (OVERRIDES / relative_path).read_text(encoding="utf-8")
    function = find_function(ast.parse(text).body, name)
    if function is None:
        raise LookupError(f"modeling_overrides/{relative_path} defines no function {name}")
    return "".join(text.splitlines(keepends=True)[function.lineno - 1 : function.end_lineno])


ROPE_UTILS = "src/transformers/modeling_rope_utils.py"
CACHE_UTILS = "src/transformers/cache_utils.py"


def _generation_utils_edits() -> tuple[MemberEdit, ...]:
    """
    Pull request 01's edits: `longrope_switch_length` in the RoPE utilities, and `GenerationMixin`'s members as it
    leaves them (read from `modeling_overrides/generation/utils.py`), each pinned by the sha256 of the 5.24 source it
    replaces.
    """
    path = "src/transformers/generation/utils.py"

    def source(name):
        return override_source("generation/utils.py", "GenerationMixin", name)

    cache_is_stale = source("_cache_is_stale_at_longrope_switch")
    if cache_is_stale.count(PER_ROW_SWITCH_LENGTHS) != 1:
        raise LookupError("GenerationMixin._cache_is_stale_at_longrope_switch no longer reads each row's length")

    return (
        MemberEdit(
            ROPE_UTILS,
            AddFunction(
                "longrope_switch_length",
                override_function("modeling_rope_utils.py", "longrope_switch_length"),
                after="dynamic_rope_update",
            ),
        ),
        MemberEdit(
            path,
            ReplaceMethod("GenerationMixin", "prepare_inputs_for_generation", source("prepare_inputs_for_generation")),
            "018a76f42a134e27245c17b3ac03d798a29b224522ae5a273e270e3389b7dc5c",
        ),
        MemberEdit(
            path,
            ReplaceLines(
                "from ..masking_utils import create_masks_for_generate\n",
                "from ..masking_utils import create_masks_for_generate\n"
                "from ..modeling_rope_utils import longrope_switch_length\n",
            ),
        ),
        MemberEdit(
            path,
            AddMethod(
                "GenerationMixin",
                "_cache_is_stale_at_longrope_switch",
                # As it stands before the per-row pull request
                cache_is_stale.replace(PER_ROW_SWITCH_LENGTHS, LONGEST_ROW_SWITCH_LENGTHS),
                after="_prepare_cache_for_generation",
            ),
        ),
        MemberEdit(
            path,
            ReplaceMethod("GenerationMixin", "_assisted_decoding", source("_assisted_decoding")),
            "994ed7dec46c94434a282bd1c79f8955d9d54809d534ba5391a19066a97d832c",
        ),
    )


LONGEST_ROW_SWITCH_LENGTHS = """\
    cached_length, new_length = past_length, sequence_length
    if attention_mask is not None and position_ids is not None:
        # Left padding: the length of the longest row, read from the device on the steps past the padded switch
        cached_length, new_length = (
            position_ids[..., [past_length - 1, -1]].reshape(-1, 2).amax(dim=0) + 1
        ).tolist()
    if not cached_length <= switch_length < new_length:
        return False
"""
PER_ROW_SWITCH_LENGTHS = """\
    cached_lengths, new_lengths = [past_length], [sequence_length]
    if attention_mask is not None and position_ids is not None:
        # Left padding: each row switches at its own length (read from the device past the padded switch length)
        cached_lengths, new_lengths = (position_ids[..., [past_length - 1, -1]].reshape(-1, 2) + 1).T.tolist()
    if not any(cached <= switch_length < new for cached, new in zip(cached_lengths, new_lengths)):
        return False
"""
"""How `generate()` finds the switch in a left-padded batch: at the longest row's length (pull request 01), then at
each row's own (the per-row pull request), in `GenerationMixin._cache_is_stale_at_longrope_switch` at column 4."""

DYNAMIC_ROPE_UPDATE_HASH = "c0bc145a218270ce1bc985d328af017b76c8f0fdc15969cd456950457d430cbb"


def _per_row_edits() -> tuple[MemberEdit, ...]:
    """Longrope's frequencies per row in the shared RoPE decorator, and `generate()` finding each row's switch."""
    indented = "".join(f"    {line}" if line.strip() else line for line in LONGEST_ROW_SWITCH_LENGTHS.splitlines(True))
    per_row = "".join(f"    {line}" if line.strip() else line for line in PER_ROW_SWITCH_LENGTHS.splitlines(True))
    return (
        MemberEdit(
            ROPE_UTILS,
            ReplaceFunction("dynamic_rope_update", override_function("modeling_rope_utils.py", "dynamic_rope_update")),
            DYNAMIC_ROPE_UPDATE_HASH,
        ),
        MemberEdit("src/transformers/generation/utils.py", ReplaceLines(indented, per_row)),
    )


PHI_CACHE_DROPS = (
    ("phi3", "Phi3ForCausalLM", "35d9513333e953ff168c70854202073ee3974f673fd7ae1323b8c26d4f84da83"),
    ("phimoe", "PhimoeForCausalLM", "0c05def4bbadf3d399ec0f7acd0765ab3bdd07d9ab8d62105f60214faaa4446a"),
    (
        "phi4_multimodal",
        "Phi4MultimodalForCausalLM",
        "00db00e593ff6e18374d3f028ad5df71a7e981b975a397d4a9667e6ed0efc18b",
    ),
)
"""The models whose `prepare_inputs_for_generation` only drops the cache at the longrope switch: `(model, causal LM
class, hash of that method in the modular file)`. The modeling file's copy is the modular file's as the converter
writes it (Phi-3's calls `GenerationMixin` by name where its modular file says `super()`)."""

PHI3_MODELING_HASH = "0c05def4bbadf3d399ec0f7acd0765ab3bdd07d9ab8d62105f60214faaa4446a"
PHI4_MULTIMODAL_MODELING_HASH = "00db00e593ff6e18374d3f028ad5df71a7e981b975a397d4a9667e6ed0efc18b"


def _cache_drop_removals() -> tuple[MemberEdit, ...]:
    """The three per-model cache drops go, in the modular and the generated modeling file of each model."""
    modeling_hashes = {"phi3": PHI3_MODELING_HASH, "phimoe": PHI3_MODELING_HASH}
    edits = []
    for model, class_name, modular_hash in PHI_CACHE_DROPS:
        for kind, expected_hash in (
            ("modular", modular_hash),
            ("modeling", modeling_hashes.get(model, PHI4_MULTIMODAL_MODELING_HASH)),
        ):
            path = f"src/transformers/models/{model}/{kind}_{model}.py"
            # What only the removed method imported goes too (`build.series_files` has ruff remove unused imports)
            edits.append(MemberEdit(path, RemoveMethod(class_name, "prepare_inputs_for_generation"), expected_hash))
    return tuple(edits)


PHI3_MODEL_FORWARD_HASH = "8a465d4b9213bf33c8e6a8539dca46b9a4f1221879d996d91132e972b37df411"
PHI3_MODULAR = "src/transformers/models/phi3/modular_phi3.py"
PHI3_MODELING = "src/transformers/models/phi3/modeling_phi3.py"
PHI3_MODULAR_MODEL = """class Phi3Model(MistralModel):
    @recompute_cache_at_longrope_switch
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, **super_kwargs):
        return super().forward(**super_kwargs)


"""


def _decoding_loop_edits() -> tuple[MemberEdit, ...]:
    """
    The cache keeps the ids its first tokens were fed as (through batch operations too), the decorator in the RoPE
    utilities feeds them again, on Phi-3's decoder (its modular file defines the decoder for it).
    """
    return (*_cache_keeps_input_ids_edits(), *_rope_utils_recompute_edits(), *_phi3_decoder_edits())


def _add_line_after(path: str, line: str, added: str) -> MemberEdit:
    return MemberEdit(path, ReplaceLines(line, line + added))


def _cache_method(name: str, expected_hash: str) -> MemberEdit:
    source = override_source("cache_utils.py", "Cache", name)
    return MemberEdit(CACHE_UTILS, ReplaceMethod("Cache", name, source), expected_hash)


def _cache_keeps_input_ids_edits() -> tuple[MemberEdit, ...]:
    """`Cache` declares the ids of its first tokens; `reset` and the batch operations keep them in step."""
    return (
        _add_line_after(
            CACHE_UTILS,
            "        self.offloading = offloading\n",
            "        # The first `original_max_position_embeddings` ids fed through a longrope model, and whether its keys\n"
            "        # were rotated with the long factors (see `recompute_cache_at_longrope_switch`)\n"
            "        self._longrope_input_ids = None\n"
            "        self._longrope_long_factors = False\n",
        ),
        _cache_method("reset", "8abb860460ff056796dedc6c6ce99ca3fa346b006467cc1ffc2be9e9a1683a80"),
        _cache_method("reorder_cache", "1539ddde774467471b66121c40d1bc4adcc45eb99f59dc13c8e85214e3a120a0"),
        _cache_method("batch_repeat_interleave", "815eeac54c4305d9dfbfd3e7f1e5ad20e99204751186724c5d53c1e95e8afb95"),
        _cache_method("batch_select_indices", "139d9748fee2931558f9bff1a4fb9098a265c3a8b559faa34f1da77817bd1a0c"),
    )


def _rope_utils_recompute_edits() -> tuple[MemberEdit, ...]:
    """The decorator `recompute_cache_at_longrope_switch` in the RoPE utilities, with its imports."""
    return (
        MemberEdit(ROPE_UTILS, ReplaceLines("import math\n", "import inspect\nimport math\n")),
        MemberEdit(
            ROPE_UTILS,
            ReplaceLines(
                "from .utils import is_torch_available, logging\n",
                "from .utils import is_torch_available, is_torchdynamo_compiling, logging\n",
            ),
        ),
        *(
            MemberEdit(ROPE_UTILS, AddFunction(name, override_function("modeling_rope_utils.py", name), after=after))
            for name, after in RECOMPUTE_FUNCTIONS
        ),
    )


RECOMPUTE_FUNCTIONS = (
    ("recompute_cache_at_longrope_switch", "longrope_switch_length"),
    ("_can_feed_longrope_ids_again", "recompute_cache_at_longrope_switch"),
    ("_longrope_recorded_ids", "_can_feed_longrope_ids_again"),
    ("_outputs_of_new_tokens", "_longrope_recorded_ids"),
)
"""The decorator and its helpers, each added after the one before (as `modeling_overrides` orders them)."""


def _phi3_decoder_edits() -> tuple[MemberEdit, ...]:
    """Phi-3's decoder decorated, in its modeling file and in its modular file (which then defines the decoder)."""
    return (
        MemberEdit(
            PHI3_MODELING,
            ReplaceLines(
                "from ...modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update\n",
                "from ...modeling_rope_utils import (\n    ROPE_INIT_FUNCTIONS,\n    dynamic_rope_update,\n"
                "    recompute_cache_at_longrope_switch,\n)\n",
            ),
        ),
        MemberEdit(
            PHI3_MODELING,
            AddDecorator("Phi3Model", "forward", "recompute_cache_at_longrope_switch"),
            PHI3_MODEL_FORWARD_HASH,
        ),
        _add_line_after(
            PHI3_MODULAR,
            "from ...modeling_flash_attention_utils import FlashAttentionKwargs\n",
            "from ...modeling_rope_utils import recompute_cache_at_longrope_switch\n",
        ),
        MemberEdit(
            PHI3_MODULAR,
            ReplaceLines("from ...utils import logging\n", "from ...utils import auto_docstring, logging\n"),
        ),
        _add_line_after(
            PHI3_MODULAR,
            "from ...utils.deprecation import deprecate_kwarg\n",
            "from ...utils.generic import merge_with_config_defaults\nfrom ...utils.output_capturing import capture_outputs\n",
        ),
        _add_line_after(PHI3_MODULAR, "    MistralForTokenClassification,\n", "    MistralModel,\n"),
        MemberEdit(
            PHI3_MODULAR,
            ReplaceLines(
                "class Phi3ForCausalLM(MistralForCausalLM):\n",
                PHI3_MODULAR_MODEL + "class Phi3ForCausalLM(MistralForCausalLM):\n",
            ),
        ),
    )


SERIES = (
    PullRequest(
        slug="generate-longrope-cache",
        title="[generate] Recompute the KV cache in place when a longrope model crosses its switch length",
        edits=(*_generation_utils_edits(), *_cache_drop_removals()),
        tests=TestModule(
            module="longrope_generation.py",
            checkout_path="tests/generation/test_utils.py",
            new_path="tests/generation/test_longrope_generation.py",
        ),
        regression_guards=(
            "LongRopeGenerationTest::test_cache_before_the_switch_is_recomputed_with_the_long_factors_1_phi3",
            "LongRopeGenerationTest::test_generate_across_the_switch_01_phi3_greedy",
            "LongRopeGenerationTest::test_generate_across_the_switch_03_phi3_sample",
            "LongRopeGenerationTest::test_generate_across_the_switch_05_phi3_prompt_lookup",
            "LongRopeGenerationTest::test_beam_search_across_the_switch_1_phi3",
        ),
        description="01-generate-longrope-cache.md",
    ),
    PullRequest(
        slug="decoding-loop-longrope-cache",
        title="[Phi-3] Recompute the KV cache in place when a decoding loop crosses the longrope switch",
        edits=_decoding_loop_edits(),
        tests=TestModule(
            module="longrope_decoding_loop.py",
            checkout_path="tests/models/phi3/test_modeling_phi3.py",
            new_path="tests/models/phi3/test_modeling_phi3_longrope_cache.py",
        ),
        regression_guards=(),
        description="02-decoding-loop-longrope-cache.md",
    ),
    PullRequest(
        slug="longrope-factors-per-row",
        title="[RoPE] Longrope factors per row: each row of a left-padded batch switches at its own length",
        edits=_per_row_edits(),
        tests=TestModule(
            module="longrope_batched_generation.py",
            checkout_path="tests/generation/test_utils.py",
            new_path="tests/generation/test_longrope_generation.py",
        ),
        regression_guards=(),
        description="03-longrope-factors-per-row.md",
    ),
)
"""The series, in the order the pull requests apply."""

SERIES_TEST_FILES = tuple(dict.fromkeys(path for pr in SERIES for path in (pr.tests.checkout_path, pr.tests.new_path)))
"""Every test file the series writes to, upstream's or new: a pristine tree has their packages."""
