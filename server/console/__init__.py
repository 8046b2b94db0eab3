"""The operators' web console: runs, sites, registry and fleet, on the registry's FastAPI app."""
