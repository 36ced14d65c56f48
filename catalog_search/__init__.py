"""The application layer: the `catalog-search` command line and the demo.

It is the one place that imports both `pipelines` (batch stages) and `serving` (lookups);
neither of those imports it.
"""
