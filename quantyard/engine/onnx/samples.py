"""Shipped text: validation sentences and the default calibration set (pure data).

Validation sentences differ in length so that a batch carries real padding: an export whose
attention mask handling was traced for one shape shows up here, not in production.
"""

from __future__ import annotations

VALIDATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Quantization reduces model size.",
    "How do I convert a PyTorch model to ONNX for deployment on a CPU at the edge?",
    "Paris is the capital of France.",
)

# Used for int8-static when the job gives no calibration_texts. Everyday sentences of varied
# topic and length, so activation ranges are not fitted to one domain.
DEFAULT_CALIBRATION_TEXTS = (
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome and everyone loved it.",
    "The cat sits outside on the mat near the door.",
    "Machine learning models can run on small devices.",
    "What is the weather like tomorrow in Berlin?",
    "Stock markets fell sharply after the announcement on Tuesday.",
    "Please restart the server before applying the security update.",
)

# One sentence for batch-1 latency, eight for throughput.
LATENCY_TEXT = VALIDATION_TEXTS[2]
THROUGHPUT_BATCH = 8

__all__ = ["VALIDATION_TEXTS", "DEFAULT_CALIBRATION_TEXTS", "LATENCY_TEXT", "THROUGHPUT_BATCH"]

# Text-generation decoders: prompts whose prefill logits and greedy continuations are compared
# with transformers (prose, code, a question; different lengths, so the batch is left-padded).
DECODER_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the foot of the mountains, there lived",
)
# Batch-1 prompt whose generation is timed per token.
DECODER_LATENCY_PROMPT = DECODER_PROMPTS[2]
