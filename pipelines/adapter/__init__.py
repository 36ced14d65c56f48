"""Trained embedding adapters: model space -> index space (docs/ARCHITECTURE.md "Vector spaces").

The public API (used by pipelines.index, serving and the delta writer):

    from pipelines.adapter import load_adapter, load_for_version, apply_adapter, adapter_id
    adapter = load_adapter(ADAPTER_DIR)                   # verified, or AdapterError
    adapter = load_for_version(version_dir, manifest.adapter)   # None: no adapter
    index_vectors = apply_adapter(adapter, raw_vectors)   # identity when adapter is None
    adapter_id(adapter)                                   # "linear256@1a2b3c4d5e6f" / None

Training (`catalog-search train-adapter`) is pipelines/adapter/commands.py (TensorFlow is
imported only there, in train.py).
"""
from pipelines.adapter.artifact import (FORMAT, VERSION_ADAPTER_DIR, Adapter, AdapterError,
                                        adapter_id, apply_adapter, load_adapter,
                                        load_for_version)

__all__ = ["FORMAT", "VERSION_ADAPTER_DIR", "Adapter", "AdapterError", "adapter_id",
           "apply_adapter", "load_adapter", "load_for_version"]
