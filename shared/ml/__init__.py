"""The torch part of the shared core: models, data loading, training, checkpoints, weights.

Kept apart from ``fedge.shared`` so that the device side, which may import only the
torch-free core, cannot reach it by accident (``tests/test_import_direction.py``).
"""
