"""
Testing the patches' RoPE frequency updates where they bind the pull-request series' own: on the release the series is
written for, longrope rotates with the series' `dynamic_rope_update`, and the patches keep what it leaves to them.
"""

import inspect
import unittest
from unittest import mock

import torch

import patches
import transformers
from patches import rope_frequencies, targets
from patches.coverage import ERAS, era_of_release
from patches.rope_frequencies import PackedSequenceLengths, dynamic_rope_update, packed_sequence_lengths
from patches.tiny_models import SWITCH_POINT, tiny_llama_model
from upstream_pr.series.build import SERIES_RELEASE


BINDS_SERIES_ROPE_UPDATE = targets._binds_series_rope_update()


def left_padded_positions(padding: int) -> torch.LongTensor:
    """Two rows of `SWITCH_POINT + 2` tokens: the first crosses the switch, the second is left-padded by `padding`
    and does not."""
    length = SWITCH_POINT + 2
    positions = torch.arange(length).repeat(2, 1)
    positions[1] = (positions[1] - padding).clamp(min=0)
    return positions


class CountingRotaryForward:
    """The undecorated rotary `forward` of the tiny Llama, counting its calls."""

    def __init__(self, rotary_embedding):
        self.forward = inspect.unwrap(type(rotary_embedding).forward)
        self.calls = 0

    def __call__(self, module, x, position_ids, **kwargs):
        self.calls += 1
        return self.forward(module, x, position_ids, **kwargs)


class SeriesRopeUpdateBindingTest(unittest.TestCase):
    def test_only_the_series_release_binds_the_series_update(self):
        self.assertEqual(
            [era.name for era in ERAS if era.binds_series_rope_update], [era_of_release(str(SERIES_RELEASE)).name]
        )

    @unittest.skipUnless(BINDS_SERIES_ROPE_UPDATE, "the series' longrope update is bound on its release only")
    def test_a_batch_rotates_in_one_pass_each_row_as_alone(self):
        model = tiny_llama_model()
        rotary_embedding = model.model.rotary_emb
        counting_forward = CountingRotaryForward(rotary_embedding)
        forward = torch.no_grad()(dynamic_rope_update(counting_forward, series_longrope_update=True))
        x = torch.zeros(2, SWITCH_POINT + 2, 8)
        positions = left_padded_positions(padding=4)

        cos, sin = forward(rotary_embedding, x, positions)
        self.assertEqual(counting_forward.calls, 1)
        for row in range(2):
            row_cos, row_sin = forward(rotary_embedding, x[row : row + 1], positions[row : row + 1])
            torch.testing.assert_close(cos[row : row + 1], row_cos, rtol=0, atol=0)
            torch.testing.assert_close(sin[row : row + 1], row_sin, rtol=0, atol=0)

        # The patches' own per-row rotation, which older releases run, gives the same numbers in two passes
        counting_forward.calls = 0
        own_forward = torch.no_grad()(dynamic_rope_update(counting_forward))
        own_cos, own_sin = own_forward(rotary_embedding, x, positions)
        self.assertEqual(counting_forward.calls, 2)
        torch.testing.assert_close(own_cos, cos, rtol=0, atol=0)
        torch.testing.assert_close(own_sin, sin, rtol=0, atol=0)

    @unittest.skipUnless(BINDS_SERIES_ROPE_UPDATE, "the series' longrope update is bound on its release only")
    def test_packed_sequences_keep_the_patches_rotation_per_sequence(self):
        model = tiny_llama_model()
        rotary_embedding = model.model.rotary_emb
        forward = torch.no_grad()(dynamic_rope_update(inspect.unwrap(type(rotary_embedding).forward), True))
        # One row packing two sequences: 4 tokens of one of `SWITCH_POINT + 4` and 4 of one of 8
        positions = torch.cat([torch.arange(SWITCH_POINT, SWITCH_POINT + 4), torch.arange(4, 8)])[None]
        lengths = PackedSequenceLengths(torch.tensor([[SWITCH_POINT + 4] * 4 + [8] * 4]), (SWITCH_POINT + 4, 8))
        x = torch.zeros(1, 8, 8)

        with packed_sequence_lengths(lengths):
            cos, sin = forward(rotary_embedding, x, positions)
        long_cos, long_sin = forward(rotary_embedding, x[:, :4], torch.arange(SWITCH_POINT + 4)[None])
        short_cos, short_sin = forward(rotary_embedding, x[:, 4:], torch.arange(8)[None])
        torch.testing.assert_close(cos, torch.cat([long_cos[:, -4:], short_cos[:, -4:]], dim=1), rtol=0, atol=0)
        torch.testing.assert_close(sin, torch.cat([long_sin[:, -4:], short_sin[:, -4:]], dim=1), rtol=0, atol=0)

    def test_apply_binds_the_series_update_on_its_release_only(self):
        self.addCleanup(patches.revert)
        patches.apply()
        self.assertEqual(BINDS_SERIES_ROPE_UPDATE, era_of_release(transformers.__version__).binds_series_rope_update)
        model = tiny_llama_model()
        input_ids = torch.randint(1, 97, (2, SWITCH_POINT + 2))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :4] = 0
        patches_update = mock.patch.object(
            rope_frequencies, "longrope_frequency_update", wraps=rope_frequencies.longrope_frequency_update
        )
        with patches_update as longrope_frequency_update, torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
        self.assertEqual(longrope_frequency_update.called, not BINDS_SERIES_ROPE_UPDATE)
