"""
`make diff`: the pull-request series on a pristine tree of the installed release. Each pull request is verified at its
place (its tests fail before it and pass with it, it applies, ruff finds nothing new), stays within its size, never
creates a file upstream has, and a tree the series cannot be placed on is refused by name with nothing written.
"""

import ast
import io
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from packaging.version import Version

import transformers
from upstream_pr.diff import build_pristine_tree, unified_diff
from upstream_pr.series import SERIES, SERIES_TEST_FILES, TEST_MODULES, MemberEdit
from upstream_pr.series.build import SERIES_RELEASE, UnplaceableSeriesError, check_release, series_files
from upstream_pr.series.description import describe, line_counts
from upstream_pr.series.verify import verify_pull_request, write_texts


REPOSITORY = Path(__file__).resolve().parents[1]
INSTALLED = Version(transformers.__version__)
MAX_ADDED_LINES = 300
MAX_ADDED_LINES_OF_FIRST_THREE = 500


def added_lines(files) -> int:
    return sum(line_counts(before, after)[0] for before, after in files.texts.values())


@unittest.skipUnless(
    INSTALLED.release[:2] == SERIES_RELEASE.release[:2],
    f"the series is written for transformers {SERIES_RELEASE.major}.{SERIES_RELEASE.minor}; {INSTALLED} is served "
    "by the run-time patches",
)
class PullRequestSeriesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.workdir = Path(tempfile.mkdtemp())
        cls.tree = build_pristine_tree(cls.workdir / "pristine", SERIES_TEST_FILES)
        cls.series = series_files(cls.tree)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir)

    def test_every_pull_request_verifies_at_its_place(self):
        running_tree = self.workdir / "running"
        shutil.copytree(self.tree, running_tree)
        for files in self.series:
            with self.subTest(files.name):
                report = verify_pull_request(running_tree, files, self.workdir)
                self.assertTrue(report.ok, "\n".join(report.lines()))
                self.assertTrue(report.failing_before)
                self.assertEqual(report.transformers_imported_from, "src/transformers/__init__.py")
            write_texts(running_tree, files.texts)

    def test_sizes(self):
        for files in self.series:
            self.assertLessEqual(added_lines(files), MAX_ADDED_LINES, files.name)
        self.assertLessEqual(sum(added_lines(files) for files in self.series[:3]), MAX_ADDED_LINES_OF_FIRST_THREE)

    def test_no_file_upstream_has_is_created(self):
        # The pristine tree has no tests: they go to files upstream does not have
        for files in self.series:
            for path, (before, _) in files.texts.items():
                if before is None:
                    self.assertFalse(path.startswith("src/"), path)
                    self.assertEqual(path, files.pull_request.tests.new_path)

    def test_tests_are_merged_into_a_checkout_file(self):
        tree = self.workdir / "checkout"
        shutil.copytree(self.tree, tree)
        checkout_path = SERIES[0].tests.checkout_path
        (tree / checkout_path).write_text("import unittest\n\n\nclass UpstreamTest(unittest.TestCase):\n    pass\n")
        series = series_files(tree)
        files = series[0]
        self.assertEqual(files.test_paths, [checkout_path])
        before, after = files.texts[checkout_path]
        self.assertTrue(after.startswith("import unittest\n"))
        self.assertIn("class UpstreamTest(unittest.TestCase):", after)
        self.assertIn("class LongRopeGenerationTest(unittest.TestCase):", after)
        self.assertNotIn(SERIES[0].tests.new_path, files.texts)
        self.assertIn(f"+++ b/{checkout_path}", unified_diff(files.texts))
        # The later pull requests' tests use that file's tester: merged after it, or imported from it
        self.assertEqual(series[2].test_paths, [checkout_path])
        self.assertIn("class LongRopeBatchedGenerationTest(unittest.TestCase):", series[2].texts[checkout_path][1])
        loop_tests = series[1].texts[series[1].test_paths[0]][1]
        self.assertIn("from ...generation.test_utils import LongRopeGenerationTester\n", loop_tests)

    def test_later_tests_import_the_tester_from_where_it_went(self):
        loop_tests = self.series[1].texts[self.series[1].test_paths[0]][1]
        self.assertEqual(self.series[0].test_paths, ["tests/generation/test_longrope_generation.py"])
        self.assertIn("from ...generation.test_longrope_generation import LongRopeGenerationTester\n", loop_tests)
        self.assertEqual(self.series[2].test_paths, self.series[0].test_paths)

    def test_a_changed_member_is_refused_by_name(self):
        tree = self.workdir / "changed"
        shutil.copytree(self.tree, tree)
        path = tree / "src/transformers/generation/utils.py"
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("# Instantiate output\n", "# Instantiate the output\n", 1), encoding="utf-8")
        with self.assertRaisesRegex(
            UnplaceableSeriesError,
            "src/transformers/generation/utils.py: GenerationMixin.prepare_inputs_for_generation differs",
        ):
            series_files(tree)

    def test_another_release_is_refused(self):
        tree = self.workdir / "older"
        shutil.copytree(self.tree, tree)
        init = tree / "src/transformers/__init__.py"
        init.write_text(init.read_text().replace(f'"{INSTALLED}"', '"4.57.6"'), encoding="utf-8")
        with self.assertRaisesRegex(UnplaceableSeriesError, "this tree is 4.57.6.*run-time patches"):
            check_release(tree)
        init.write_text(init.read_text().replace('"4.57.6"', '"5.25.0.dev0"'), encoding="utf-8")
        self.assertEqual(check_release(tree), Version("5.25.0.dev0"))

    def test_every_member_edit_is_pinned(self):
        for pull_request in SERIES:
            for member_edit in pull_request.edits:
                if type(member_edit.edit).__name__ in ("ReplaceMethod", "RemoveMethod"):
                    self.assertIsNotNone(member_edit.expected_hash, member_edit.member)
        self.assertIsInstance(SERIES[0].edits[0], MemberEdit)

    def test_descriptions_have_no_placeholder_left(self):
        for files in self.series:
            description = describe(files, INSTALLED, None)
            self.assertNotIn("{", description.split("## Before submitting")[0].replace("`{", ""))
            self.assertIn("#33129", description)
            self.assertIn("# What does this PR do?", description)

    def test_make_diff_refuses_without_writing(self):
        with tempfile.TemporaryDirectory() as output_dir:
            tree = self.workdir / "refused"
            shutil.copytree(self.tree, tree)
            init = tree / "src/transformers/__init__.py"
            init.write_text(init.read_text().replace(f'"{INSTALLED}"', '"4.57.6"'), encoding="utf-8")
            result = subprocess.run(
                [
                    sys.executable,
                    "scripts/make_pr_diff.py",
                    "--transformers-src",
                    str(tree),
                    "--output-dir",
                    output_dir,
                ],
                cwd=REPOSITORY,
                capture_output=True,
                text=True,
                check=False,
            )
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertIn("this tree is 4.57.6", result.stderr)
            self.assertEqual(list(Path(output_dir).iterdir()), [])

    def test_make_diff_writes_the_series_and_nothing_stale(self):
        with tempfile.TemporaryDirectory() as output_dir:
            (Path(output_dir) / "07-old-slug.diff").write_text("stale")
            command = [sys.executable, "scripts/make_pr_diff.py", "--output-dir", output_dir]
            result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=False)
            self.assertEqual(result.returncode, 0, result.stderr)
            names = sorted(path.name for path in Path(output_dir).iterdir())
            expected = sorted(f"{files.name}.{suffix}" for files in self.series for suffix in ("diff", "md"))
            self.assertEqual(names, expected)
            first = (Path(output_dir) / f"{self.series[0].name}.diff").read_text()
            self.assertEqual(first, unified_diff(self.series[0].texts))


def series_test_cases():
    """
    The test classes of each pull request's module, in the order of the series, each module run as the series' files
    hold it: it sees the names of the modules before it, which it imports (relative imports, left out here) or is
    merged after.
    """
    earlier = {}
    for pull_request in SERIES:
        path = TEST_MODULES / pull_request.tests.module
        lines = path.read_text(encoding="utf-8").splitlines()
        code = "\n".join(line for line in lines if not line.startswith("from ."))
        module = dict(earlier)
        exec(compile(code, str(path), "exec"), module)  # the series' own test modules
        yield [
            case
            for name, case in module.items()
            if isinstance(case, type) and issubclass(case, unittest.TestCase) and earlier.get(name) is not case
        ]
        earlier.update(module)


RUN_TIME_DIFFERENCES = {
    "test_cache_filled_from_embeddings_is_reported": "the run-time patches raise StaleRopeCacheError where the pull "
    "request warns",
    "test_batch_reordered_and_selected_before_the_switch": "the run-time patches forget a cache's inputs when it is "
    "reordered or narrowed, and raise StaleRopeCacheError at the switch",
}
"""The series' tests that the run-time patches fail today, and why: each must still fail (so that this table is
updated when the patches catch up)."""


@unittest.skipUnless(
    INSTALLED.release[:2] == SERIES_RELEASE.release[:2],
    f"the series' tests are written for transformers {SERIES_RELEASE.major}.{SERIES_RELEASE.minor}",
)
class RunTimePatchesPassTheSeriesTestsTest(unittest.TestCase):
    """What each pull request of the series fixes, `patches.apply()` fixes on the installed release too."""

    def test_the_series_tests_pass_with_the_run_time_patches(self):
        import patches

        self.addCleanup(patches.revert)
        patches.apply()
        failed = set()
        for cases in series_test_cases():
            suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(case) for case in cases)
            result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
            self.assertGreater(result.testsRun, 0)
            failed |= {test._testMethodName for test, _ in result.failures + result.errors}
        self.assertEqual(failed, set(RUN_TIME_DIFFERENCES))


class SeriesTestConfigsTest(unittest.TestCase):
    """The series' tests share one tiny config, spelled once: the first pull request's tester, which the others use."""

    @staticmethod
    def config_keywords(module_path: Path) -> set[str]:
        module = ast.parse(module_path.read_text(encoding="utf-8"))
        calls = [
            node
            for node in ast.walk(module)
            if isinstance(node, ast.Call) and any(keyword.arg == "rope_parameters" for keyword in node.keywords)
        ]
        return {ast.dump(keyword) for call in calls for keyword in call.keywords}

    def test_the_tiny_config_is_spelled_once(self):
        configs = [self.config_keywords(TEST_MODULES / pull_request.tests.module) for pull_request in SERIES]
        self.assertTrue(configs[0])
        self.assertEqual([config for config in configs[1:] if config], [])
        for pull_request in SERIES[1:]:
            self.assertIn("LongRopeGenerationTester()", pull_request.tests.text)
