"""Adapters that connect inference engines (Hugging Face transformers, vLLM) to a cascade-kv store."""
