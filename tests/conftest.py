"""Root fixtures. Service fixtures live in tests/fixtures/services.py, model fixtures in
tests/fixtures/models.py; both are loaded as plugins so every test directory can use them."""

from quantyard.native_env import tune_native_runtimes

# As the CLI does for every product process, and before the plugins below import torch or
# llama.cpp: the suite runs both in this process (quantyard/native_env.py says why).
tune_native_runtimes()

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.models",
    "tests.fixtures.smollm2",
    "tests.fixtures.onnx_models",
    "tests.fixtures.onnx_encoders",
]


def pytest_configure(config) -> None:
    """Quality reports in the suite score 2 chunks of the evaluation text (510 tokens), not the
    product's 16: every GGUF conversion of every test is evaluated, in this process and in the
    API/worker/CLI processes the tests start (they inherit the environment). Tests that measure
    the evaluation itself give their extent explicitly. Likewise the speed test of each GGUF
    artifact runs pp32/tg8 once (the product: pp512/tg128, 3 runs)."""
    import os

    os.environ.setdefault("QUANTYARD_EVALUATION_CHUNKS", "2")
    for name, value in (("QUANTYARD_SPEED_REPETITIONS", "1"), ("QUANTYARD_SPEED_N_PROMPT", "32"),
                        ("QUANTYARD_SPEED_N_GEN", "8")):
        os.environ.setdefault(name, value)
