"""torch_ref.GPT as a Hugging Face model, for variants that are not plain GPT-2.

An exported folder holds this file as `modeling_jaxgpt.py`, next to copies of the torch_ref and jaxgpt.spec
modules it imports (jaxgpt.export.modeling_sources); its config.json maps `AutoConfig`/`AutoModelForCausalLM`
(via `auto_map`) to these classes, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
computes with torch_ref without jaxgpt installed. The state dict is torch_ref's under the prefix `gpt.`.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from jaxgpt.spec.config import ModelConfig

from .model import GPT


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


class JaxgptForCausalLM(PreTrainedModel):
    config_class = JaxgptConfig
    base_model_prefix = "gpt"

    def __init__(self, config: JaxgptConfig):
        super().__init__(config)
        self.gpt = GPT(config.model_config)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the checkpoint; torch_ref's constructor already initialised them."""

    def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V] (fp32 on CPU). Other HF arguments (attention_mask, ...) are
        ignored: the model is causal and lm-eval feeds unpadded or right-padded rows."""
        return CausalLMOutput(logits=self.gpt(input_ids))
