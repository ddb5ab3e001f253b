"""Evaluation: suites as data, grading, scorer kinds, the sandbox for generated code, the runner."""
