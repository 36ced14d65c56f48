"""Beam pipelines and the artifacts they read and write."""
