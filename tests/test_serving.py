"""
`transformers serve` from 5.25 decodes in a process it spawns for each model, a fresh interpreter that never ran
`patches.apply()`. The patches make that process's target apply them there first, with the server's policy and mode:
a spawned process, its status and its decoding are checked here on every release, the binding where the release
spawns one. The whole server, across the switch, is tests/test_serve.py.
"""

import importlib
import importlib.util
import multiprocessing
import queue
import time
import unittest
from unittest import mock

import patches
from patches import targets
from patches.__main__ import serve
from patches.coverage import SERVING
from patches.reference import FP32_TOLERANCE, hand_written_loop_errors
from patches.serving import RunInPatchedProcess, run_in_patched_process
from patches.tiny_models import SWITCH_POINT, random_tokens, tiny_phi3_model


def has_server() -> bool:
    """Whether this release has `transformers serve`'s model manager (`find_spec` raises where `transformers.cli` is
    missing, before 5.0)."""
    try:
        return importlib.util.find_spec("transformers.cli.serving.model_manager") is not None
    except ModuleNotFoundError:
        return False


POLICY = {"dynamic": "raise", "longrope": "recompute"}
SPAWN_TIMEOUT = 120


class SpawnedTargets:
    """What a spawned process runs, as `EngineClient.run_engine` is: staticmethods of a class its process imports."""

    @staticmethod
    def report_patches(results):
        status = patches.status()
        results.put((status.applied, status.stale_cache, status.consistent, bool(status.patched)))

    @staticmethod
    def decode_across_the_switch(results):
        """The largest logit error of a hand-written loop over the tiny Phi-3, from 4 tokens before the switch to 6
        after it, against the forward pass without cache."""
        errors, _ = hand_written_loop_errors(tiny_phi3_model(), random_tokens(SWITCH_POINT + 6), SWITCH_POINT - 4)
        results.put(max(errors))


def run_spawned(target, *args):
    """Runs `target(*args, results)` in a spawned process and returns what it put on `results`; raises if the process
    ends without a result (its traceback is on stderr)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results), daemon=True)
    process.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            try:
                return results.get(timeout=1)
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"the spawned process exited with {process.exitcode} and no result") from None
        raise TimeoutError(f"the spawned process gave no result in {SPAWN_TIMEOUT} s")
    finally:
        process.kill()
        process.join()


def patched_target(attribute: str, consistent: bool = False) -> RunInPatchedProcess:
    return run_in_patched_process(SpawnedTargets, attribute, POLICY, consistent).__func__


class RunInPatchedProcessTest(unittest.TestCase):
    def setUp(self):
        patches.revert()
        self.addCleanup(patches.revert)

    def test_spawned_process_applies_the_servers_policy(self):
        applied, stale_cache, consistent, patched_something = run_spawned(patched_target("report_patches"))
        self.assertTrue(applied)
        self.assertEqual(stale_cache, POLICY)
        self.assertFalse(consistent)
        self.assertTrue(patched_something)
        self.assertFalse(patches.status().applied)  # this process was never patched

    def test_target_applies_consistent_mode_when_the_server_did(self):
        # In this process, with `apply()` mocked: a spawned one would check its kernels, which a loaded 2-core machine
        # may refuse (that refusal, and consistent mode itself, are tests/test_consistent_decoding.py's)
        results = mock.Mock()
        with mock.patch.object(patches, "apply") as apply:
            patched_target("report_patches", consistent=True)(results)
        apply.assert_called_once_with(stale_cache=POLICY, force=True, consistent=True)
        results.put.assert_called_once()

    def test_upstream_target_alone_runs_unpatched(self):
        """The control: a spawned process does not inherit the patches, which is why its target applies them."""
        applied, _, _, _ = run_spawned(SpawnedTargets.report_patches)
        self.assertFalse(applied)

    def test_spawned_process_decodes_across_the_switch_as_without_cache(self):
        self.assertLess(run_spawned(patched_target("decode_across_the_switch")), FP32_TOLERANCE)
        # The control: upstream's target, spawned alone, decodes with the stale cache
        self.assertGreater(run_spawned(SpawnedTargets.decode_across_the_switch), FP32_TOLERANCE)


class ServingBindingTest(unittest.TestCase):
    def setUp(self):
        patches.revert()
        self.addCleanup(patches.revert)

    @unittest.skipUnless(
        has_server(), "no `transformers serve` on this release, or its serving extra is not installed"
    )
    def test_binds_the_model_process_where_the_release_spawns_one(self):
        from transformers.cli.serving import model_manager

        bindings = targets.serving_bindings(POLICY, consistent=False)
        if "multiprocessing" not in targets.source(model_manager):  # it decodes in the server's process
            self.assertEqual(bindings, [])
            return
        self.assertEqual([binding.name for binding in bindings], ["EngineClient.run_engine"])
        upstream = model_manager.EngineClient.__dict__["run_engine"]
        status = patches.apply()
        self.assertNotIn(SERVING, status.unprotected)
        self.assertIn("EngineClient.run_engine", status.patched)
        self.assertIsInstance(model_manager.EngineClient.run_engine, RunInPatchedProcess)
        patches.revert()
        self.assertIs(model_manager.EngineClient.__dict__["run_engine"], upstream)

    def test_a_server_module_that_fails_to_import_needs_nothing(self):
        # 5.10 without the serving extra: importing `model_manager` raises NameError, and so would the server
        import_module = importlib.import_module

        def failing_import(name, *args, **kwargs):
            if name == "transformers.cli.serving.model_manager":
                raise NameError("name 'CompletionCreateParamsStreaming' is not defined")
            return import_module(name, *args, **kwargs)

        with mock.patch.object(importlib, "import_module", failing_import):
            self.assertEqual(targets.serving_bindings(POLICY, consistent=False), [])

    def test_refuses_a_server_that_starts_its_process_otherwise(self):
        class EngineClient:
            @staticmethod
            def start_process(model, loader, generation_state):
                return multiprocessing.get_context("fork").Process(target=EngineClient.run_engine)

            @staticmethod
            def run_engine(load, generation_state, requests, results, writer):
                pass

        binding = targets._engine_process_binding(EngineClient, POLICY, consistent=False)
        reason = binding.check(EngineClient.__dict__["run_engine"])
        self.assertIn('get_context("spawn")', reason)

    def test_serve_is_not_started_when_its_processes_would_decode_unpatched(self):
        status = patches.status()
        status.unprotected = {SERVING: "its code changed"}
        with mock.patch.object(patches, "apply", return_value=status), mock.patch("sys.stderr") as stderr:
            self.assertEqual(serve(["--help"]), 2)
        self.assertIn("its code changed", "".join(call.args[0] for call in stderr.write.call_args_list))


if __name__ == "__main__":
    unittest.main()
