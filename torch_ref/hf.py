"""torch_ref.GPT as a Hugging Face model, for variants that are not plain GPT-2.

An exported folder holds this file as `modeling_jaxgpt.py`, next to copies of the torch_ref and jaxgpt.spec
modules it imports (jaxgpt.export.modeling_sources); its config.json maps `AutoConfig`/`AutoModelForCausalLM`
(via `auto_map`) to these classes, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
computes with torch_ref without jaxgpt installed. The state dict is torch_ref's under the prefix `gpt.`.

`generate()` works with a cache, which `forward` creates on the first call with `use_cache`: a DynamicCache of keys
and values for softmax attention, FLA's cache of recurrent and convolution states for the linear mixers (FLA's
layers on CUDA, torch_ref's naive twins continuing the same recurrences on CPU). Rows of a batch must have equal
lengths: a padded attention mask is refused while decoding with a cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.variants import LINEAR_MIXERS

from .linear_attn import new_fla_cache
from .model import GPT

# The output's cache field: `cache` in recent transformers, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class JaxgptConfig(PretrainedConfig):
    """`model`: a jaxgpt ModelConfig as a dict (architecture and the four variant axes)."""

    model_type = "jaxgpt"

    def __init__(self, model: dict | None = None, **kwargs):
        self.model = dict(model or {})
        self.max_position_embeddings = ModelConfig(**self.model).block_size  # lm-eval's max_length
        kwargs.setdefault("tie_word_embeddings", False)  # torch_ref ties the head itself
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)


class JaxgptForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = JaxgptConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"

    def __init__(self, config: JaxgptConfig):
        super().__init__(config)
        self.gpt = GPT(config.model_config)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; torch_ref's constructor already initialised them."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() leaves the cache to `forward` (`new_cache`): a linear mixer's is not a DynamicCache."""
        return False

    def new_cache(self) -> Cache:
        """An empty cache of the kind this model's mixers keep."""
        return new_fla_cache() if self.config.model_config.mixer in LINEAR_MIXERS else DynamicCache()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Cache | None = None,
                use_cache: bool | None = None, previous_token: torch.Tensor | None = None,
                past_key_values: Cache | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, V] (fp32 on CPU), or at the positions `logits_to_keep` names (the last
        N, 0: all; generate() asks for 1, so a long prompt's prefill forms no [B, T, V] logits). With `use_cache`
        (or a `cache`, `past_key_values` in older transformers) input_ids continue the tokens the cache holds,
        `previous_token` [B] the last of them (`prepare_inputs_for_generation`), and the output carries the extended
        cache. Without a cache the attention mask and other HF arguments are ignored: the model is causal and lm-eval
        feeds unpadded or right-padded rows; with one, a mask with padding is an error (positions and states would
        count the padding)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("jaxgpt exports generate rows of equal length only: the attention mask has padding")
        logits = self.gpt(input_ids, cache, previous_token, logits_to_keep)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, *args, **kwargs) -> dict:
        """GenerationMixin's inputs (input_ids cut to the tokens the cache has not seen), plus `previous_token`, the
        token before them, which bigram_hash and ve_lcr read."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        fed = inputs["input_ids"].shape[1]
        if fed < input_ids.shape[1]:
            inputs["previous_token"] = input_ids[:, -fed - 1]
        return inputs
