"""Serving: load the published index, search by photo, HTTP API."""
