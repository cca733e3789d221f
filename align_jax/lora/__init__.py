"""LoRA and QLoRA for every training stage (config.lora; DESIGN.md's train state, with adapters).

tree.py     param trees by path: trainable (adapters, ...) vs frozen base, NF4 storage, merged weights
apply.py    the adapter-aware ApplyFn stages build (base tree -> adapters off) and the loss wrapper
plan.py     the driver's side: the train state's halves, their shardings, init and resume
handoff.py  a LoRA workdir read as plain params (base + merged adapters): init_from, export, eval
peft_dir.py a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)

The models (models/layers.py) declare the adapters themselves when `ModelConfig.lora_rank` > 0, and read
a frozen kernel that is an NF4 object (models/nf4.py) by dequantising it inside the layer scan.
"""

from align_jax.lora.apply import adapter_loss, model_apply_fn
from align_jax.lora.tree import merge, split

__all__ = ["adapter_loss", "merge", "model_apply_fn", "split"]
