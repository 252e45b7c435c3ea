"""On-device latency profiling: one per-layer schema across runtimes, device estimates, op coverage.

Entry point: edgediff.profiling.run.profile (the `edgediff profile` command). See docs/profiling.md.
"""
