"""What the server, the clients and the edge side all use.

Modules here that the device side imports (errors, atomic, preprocess, bundle,
telemetry) must stay free of torch and flwr.
"""
