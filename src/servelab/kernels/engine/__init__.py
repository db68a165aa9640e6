"""Conformance of an engine's own TurboQuant kernels (vLLM's) against servelab's references.

- :mod:`servelab.kernels.engine.bundle` copies the few vLLM source files the TurboQuant store
  and decode ops import into a folder of their own (with three small shims), so the ops run
  where vLLM is not installed (the GPU machine) and away from the rest of the engine
- :mod:`servelab.kernels.engine.driver` runs the engine's pieces from such a folder in a
  clean interpreter and saves what they produce (codebooks, preset sizes, packed cache bytes,
  decode outputs)
- :mod:`servelab.kernels.engine.checks` compares those against servelab's codebooks,
  presets, quantizer and float64 attention, as (preset, check, figure, verdict) rows
- :mod:`servelab.kernels.engine.report` the per-build report those rows make (JSON)
"""
