"""Evaluation: embedding, FAISS retrieval, zero-shot classification, cultural benchmarks, reports.

Nothing here imports Hydra or Lightning; ``cultureclip.evaluate`` is the Hydra entry point.
"""
