"""The export side of fedge: global model -> ONNX/TFLite artifacts -> validated, signed bundle.

Torch is allowed here (unlike ``fedge.edge.device``). Entry point:
``fedge.edge.export.pipeline.export_bundle``; ``fedge export`` is its CLI.
"""
