"""Evaluations: HellaSwag."""
