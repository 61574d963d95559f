"""Benchmarks: ``python -m lightning_tiercache.bench {limits,store,activations,kv,oom,overhead} [--json] [--full]``."""
