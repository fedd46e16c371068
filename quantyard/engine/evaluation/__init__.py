"""Issue 13's evaluation engine: an artifact's quality report on an evaluation text, computed the
way llama.cpp's `llama-perplexity --kl-divergence` does, against the source's reference outputs
stored once per source (top-k log-probs, reference.py). Pure engine code: numpy; transformers
and llama_cpp are imported inside the functions that need them."""

from .reference import DEFAULT_N_CTX, TOP_K, EvalReference, compute_eval_reference, gguf_eval_reference
from .report import QualityReport, evaluate_gguf, score_logits
from .text import MAX_EVALUATION_BYTES, check_evaluation_text, default_evaluation_text, load_evaluation_text

__all__ = ["DEFAULT_N_CTX", "TOP_K", "EvalReference", "compute_eval_reference", "gguf_eval_reference",
           "QualityReport", "evaluate_gguf", "score_logits", "MAX_EVALUATION_BYTES", "check_evaluation_text",
           "default_evaluation_text", "load_evaluation_text"]
