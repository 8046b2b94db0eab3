"""The whole pipeline on one machine: the only package that spans server, sites and edge.

``pipeline`` is ``fedge demo``; ``federation`` starts a SuperLink and enrolled
SuperNodes on loopback (also used by the integration tests and benchmarks);
``deployment`` publishes a bundle and runs an edge agent and server against it.
"""
