"""The decoder family (Llama / Qwen2 / Mistral), its scalar head, and Hugging Face interop."""
