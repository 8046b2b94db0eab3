"""fedge: federated fine-tuning with privacy, and signed deployment to edge devices.

The repository root is this package. Data flows server -> client -> edge:
``fedge.server`` coordinates runs, ``fedge.client`` trains on a site's data,
``fedge.edge.export`` turns the global model into verified artifacts and
``fedge.edge.device`` runs them on a device without torch. ``fedge.shared`` is
what all of them use.
"""

from fedge.shared.telemetry import disable_dependency_telemetry

__version__ = "0.1.0"

# Privacy product: every dependency's telemetry is off before any of them is imported.
disable_dependency_telemetry()
