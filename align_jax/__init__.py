"""align_jax: a JAX/Flax trainer for the Baichuan alignment pipeline.

The stable public API:

    cfg, params = aj.load_pretrained(hf_dir, dtype="float32")
    logits = aj.forward(cfg, params, tokens, positions=None, segment_ids=None)
    aj.save_pretrained(cfg, params, out_dir, tokenizer=None)
    out = aj.generate(cfg, params, prompt_tokens, max_new_tokens=..., temperature=0.0, top_k=0, top_p=1.0,
                      eos_id=..., seed=0)   # -> GenerateOutput(tokens, logprobs, lengths, sequences, prompt_lengths)
"""

from align_jax.generate import GenerateOutput, generate
from align_jax.models.config import ConfigError, ModelConfig
from align_jax.models.hf import CheckpointFormatError, load_pretrained, save_pretrained
from align_jax.models.transformer import Decoder, forward, init_params
from align_jax.sharding import Sharder, make_mesh

__all__ = [
    "CheckpointFormatError",
    "ConfigError",
    "Decoder",
    "GenerateOutput",
    "ModelConfig",
    "Sharder",
    "forward",
    "generate",
    "init_params",
    "load_pretrained",
    "make_mesh",
    "save_pretrained",
]
__version__ = "0.1.0"
