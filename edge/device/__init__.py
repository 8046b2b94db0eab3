"""The device side of fedge: verify signed bundles and run them with onnxruntime or LiteRT.

Nothing in this package may import torch or flwr, even transitively: an edge
box installs only ``pip install "fedge[edge]"`` (see ``tests/test_edge_torch_free.py``).
"""
