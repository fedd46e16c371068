"""Reading Hugging Face model folders (config.json, safetensors headers, tensors on demand)."""
