"""Seeing a run: the self-contained HTML page (`page`), its plots (`figures`, matplotlib, optional) and the
trackers training logs to (`trackers`: TensorBoard, W&B). Imports `runtime`, `store` and `evaluate`.
"""
