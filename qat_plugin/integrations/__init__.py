"""Integrations with other tools; each module imports its tool lazily (mlflow, keras_tuner)."""
