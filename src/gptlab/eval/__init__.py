"""Evaluations: shared-context scoring of continuations, HellaSwag, lm-evaluation-harness tasks."""
