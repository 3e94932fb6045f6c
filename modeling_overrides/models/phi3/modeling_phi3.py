# Copyright 2024 Microsoft and the HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Phi-3 causal LM whose KV cache stays consistent across the longrope switch from short to long factors."""

import torch

from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple

from ...rope_cache_utils import (
    prepare_rope_cache_update,
    refresh_rope_cache_for_generation,
    split_inputs_at_rope_switch,
)


class Phi3ForCausalLM(Phi3PreTrainedModel, GenerationMixin):
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        Example:

        ```python
        >>> from transformers import AutoTokenizer, Phi3ForCausalLM

        >>> model = Phi3ForCausalLM.from_pretrained("microsoft/Phi-3-mini-128k-instruct")
        >>> tokenizer = AutoTokenizer.from_pretrained("microsoft/Phi-3-mini-128k-instruct")

        >>> prompt = "Hey, are you conscious? Can you talk to me?"
        >>> inputs = tokenizer(prompt, return_tensors="pt")

        >>> # Generate
        >>> generate_ids = model.generate(inputs.input_ids, max_length=30)
        >>> tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        "Hey, are you conscious? Can you talk to me?\nI'm not conscious, but I can talk to you."
        ```"""
        # With longrope, a cache filled with the short factors is stale once the sequence crosses
        # `original_max_position_embeddings` (and the reverse after a crop). The stale prefix is recomputed here, in
        # the caller's cache object, so that hand-written decoding loops get the same logits as without cache. A
        # chunk whose returned logits straddle the switch runs as two forward passes, one on each side.
        segments = split_inputs_at_rope_switch(
            self.config,
            past_key_values,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            logits_to_keep=logits_to_keep,
        )
        segment_logits = []
        for segment in segments:
            rope_cache_update = prepare_rope_cache_update(
                self.config, past_key_values, embedding_layer=self.get_input_embeddings(), **segment
            )
            outputs: BaseModelOutputWithPast = self.model(
                input_ids=rope_cache_update.model_inputs["input_ids"],
                attention_mask=segment["attention_mask"],
                position_ids=rope_cache_update.model_inputs["position_ids"],
                past_key_values=past_key_values,
                inputs_embeds=rope_cache_update.model_inputs["inputs_embeds"],
                use_cache=use_cache,
                **kwargs,
            )
            rope_cache_update.commit(outputs.past_key_values)

            hidden_states = outputs.last_hidden_state
            hidden_states = slice_logits_to_keep(hidden_states, rope_cache_update.model_inputs["logits_to_keep"])
            segment_logits.append(self.lm_head(hidden_states))
        logits = torch.cat(segment_logits, dim=1) if len(segment_logits) > 1 else segment_logits[0]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        position_ids=None,
        **kwargs,
    ):
        # Overwritten -- with longrope, the cache becomes stale when the sequence crosses the switch between the short
        # and the long factors. It is then reset in place (the caller's cache object, static or dynamic, is kept) and
        # the whole sequence is fed through it again. Generation from `inputs_embeds` is left to `forward`, which
        # keeps the prompt embeddings.
        if (
            inputs_embeds is None
            and next_sequence_length is not None
            and refresh_rope_cache_for_generation(self.config, past_key_values, input_ids, position_ids)
        ):
            next_sequence_length = None

        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            **kwargs,
        )
