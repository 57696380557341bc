"""The HTTP query API for merchant dashboards (FastAPI)."""
