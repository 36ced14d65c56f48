"""Entry point of the local DirectRunner's worker processes: Beam's SDK worker, quieter.

`python -m pipelines.beam_worker` is `python -m apache_beam.runners.worker.sdk_worker_main`
with our log format on stderr and two known-noise lines dropped before Beam is imported
(a worker prints them once per process): "apitools not found …" (Beam's optional GCP
client is not installed; nothing here uses it) and "Logging handler created.".
"""
from __future__ import annotations

import logging
import sys

_NOISE = ("apitools not found", "Logging handler created", "semi_persistent_directory",
          "Load pipeline options", "Pipeline_options:", "Creating insecure")


class DropKnownNoise(logging.Filter):
    """Drops log records that start with one of the known-noise prefixes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def main() -> None:
    """Configure stderr logging, then run Beam's SDK worker main."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(DropKnownNoise())
    root = logging.getLogger()
    root.addHandler(handler)
    root.addFilter(DropKnownNoise())
    from apache_beam.runners.worker import sdk_worker_main
    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
