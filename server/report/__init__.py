"""Run reports: read a run directory, plot it, and render it as HTML (report and console)."""
