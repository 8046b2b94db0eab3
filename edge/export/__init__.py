"""The export side of fedge: global model -> ONNX/TFLite artifacts -> validated, signed bundle.

Torch is allowed here (unlike ``fedge.edge.device``). Two steps:
``fedge.edge.export.pipeline.export`` writes a signed, unvalidated bundle, and
``fedge.edge.export.validate.validate`` runs it with the device runtime;
``pipeline.export_bundle`` (``fedge export``) does both, and
``validate_bundle.revalidate_bundle`` (``fedge validate``) validates an existing bundle.
"""
