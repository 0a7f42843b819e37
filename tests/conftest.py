"""Shared test setup: tf-keras (Keras 2) must be selected before TensorFlow is imported."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The GCS emulator harness (fixtures gcs, gcs_clean, gcs_bucket, gcs_env); see tests/support/README.md.
pytest_plugins = ["tests.support.gcs_fixtures"]
