"""The model registry and fleet service: signed bundles, channels, enrolled edge devices.

``store`` keeps immutable bundle versions and channel history (a directory plus
SQLite), ``devices`` enrolls and authenticates devices, ``api`` serves both to
devices over HTTPS, and ``fleet`` summarises what each device reports.
"""
