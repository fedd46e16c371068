"""Root fixtures. Service fixtures live in tests/fixtures/services.py, model fixtures in
tests/fixtures/models.py; both are loaded as plugins so every test directory can use them."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.models",
    "tests.fixtures.smollm2",
    "tests.fixtures.onnx_models",
    "tests.fixtures.onnx_encoders",
]
