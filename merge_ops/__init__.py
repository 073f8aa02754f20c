"""Merge engine: mergekit-compatible recipes → merge plan → tensors (on disk or in a live model)."""
