"""`model.precision`: run the embedding model in float32, or with oneDNN's bfloat16 graph rewrite.

    fp32   float32 everywhere (the default).
    bf16   TensorFlow's `auto_mixed_precision_onednn_bfloat16` grappler pass: convolutions
           and matmuls in bfloat16 on oneDNN, the rest float32 (embeddings stay float32,
           L2-normalised). Needs oneDNN on (TF_ENABLE_ONEDNN_OPTS not 0) and a CPU with
           AVX512_BF16 or AMX; refused elsewhere -- TensorFlow would silently skip the
           rewrite and fp32 vectors would carry a bf16 label.
    auto   bf16 where the CPU has AVX512_BF16 or AMX and oneDNN is on, else fp32.

The launcher resolves the setting once (`resolve_precision`); the resolved value is part of
the embedding fingerprint and of the snapshot's model record, so a bf16 snapshot never
reuses or merges fp32 vectors, an index built from it records bf16, and serving applies
the same. `apply_precision` sets the grappler option, which is PROCESS-GLOBAL in TensorFlow
(it applies to every graph the process optimises from then on): it is called before any
model graph is built wherever the model runs -- the embed launcher (in-process runs), each
RunInference worker, serving, `model bench` -- and a process refuses a second, different
precision instead of mixing them.

The bf16 rewrite logs one native INFO line per optimised graph ("auto_mixed_precision.cc ...
Converted 140/368 nodes to bfloat16", after absl's "WARNING: All log messages before
absl::InitializeLog() ..."), which TF_CPP_MIN_LOG_LEVEL does not reach (TensorFlow 2.20
logs it through absl). `apply_precision` raises absl's minimum log level to WARNING when
TF_CPP_MIN_LOG_LEVEL is 1 or more (what every command of this project sets), so local runs
stay quiet; TF_CPP_MIN_LOG_LEVEL=0 keeps the lines.

`CATALOG_SEARCH_CPU_FLAGS` (a space-separated list of /proc/cpuinfo flag names) replaces the
CPU's flags for `auto`, so tests can force a CPU without the features.
"""
from __future__ import annotations

import ctypes
import glob
import mmap
import os
import re
import threading
from dataclasses import dataclass

from pipelines.model.onednn import proc_cpu_flags, onednn_status
from pipelines.core.errors import BadInputError

PRECISIONS = ("fp32", "bf16", "auto")
#: /proc/cpuinfo flags with native bfloat16 matmul / convolution support.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FLAGS_ENV = "CATALOG_SEARCH_CPU_FLAGS"
GRAPPLER_OPTION = "auto_mixed_precision_onednn_bfloat16"

_applied: str | None = None
_lock = threading.Lock()


class PrecisionError(BadInputError):
    """A precision cannot be used here (CPU, oneDNN, or another one already applied)."""


@dataclass(frozen=True)
class Precision:
    value: str     # "fp32" | "bf16"
    setting: str   # as configured: fp32 | bf16 | auto
    reason: str    # one line

    def describe(self) -> str:
        return f"{self.value} (model.precision: {self.setting}; {self.reason})"


def cpu_flags() -> set[str]:
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        return set(forced.split())
    return proc_cpu_flags()


def bf16_support() -> tuple[bool, str]:
    """(this process can run the bf16 rewrite, why / why not)."""
    present = sorted(cpu_flags() & set(BF16_FLAGS))
    if not present:
        return False, "the CPU has no AVX512_BF16 / AMX"
    status = onednn_status()
    if not status.enabled:
        return False, f"oneDNN is off ({status.reason})"
    return True, f"the CPU has {', '.join(present)} and oneDNN is on"


def resolve_precision(setting: str) -> Precision:
    """The precision `setting` means on this machine; PrecisionError for bf16 where it
    cannot run, or an unknown setting."""
    if setting not in PRECISIONS:
        raise PrecisionError(f"model.precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {setting!r}")
    if setting == "fp32":
        return Precision("fp32", setting, "as configured")
    ok, why = bf16_support()
    if setting == "bf16" and not ok:
        raise PrecisionError(f"model.precision bf16 cannot run here: {why}; use fp32 (or auto)")
    if setting == "bf16":
        return Precision("bf16", setting, why)
    return Precision("bf16" if ok else "fp32", setting, why)


def check_runnable(value: str) -> None:
    """PrecisionError unless this process can run `value` (a resolved precision)."""
    if value == "bf16":
        ok, why = bf16_support()
        if not ok:
            raise PrecisionError(f"the vectors were made in bf16 but bf16 cannot run here: "
                                 f"{why}; bf16 and fp32 vectors are never mixed")
    elif value != "fp32":
        raise PrecisionError(f"unknown precision {value!r} (expected fp32 or bf16)")


_SET_MIN_LOG_LEVEL = re.compile(rb"_ZN4absl\d+lts_\d+14SetMinLogLevelENS0_18LogSeverityAtLeastE")
_SYMBOL_TAIL = b"14SetMinLogLevelENS0_18LogSeverityAtLeastE"
_ABSL_WARNING = 1  # absl::LogSeverityAtLeast::kWarning


def quiet_native_info_logs() -> bool:
    """absl's minimum log level to WARNING in TensorFlow's native code, unless
    TF_CPP_MIN_LOG_LEVEL asks for INFO; True when it was set. Best effort: False when the
    library or its absl symbol is not found (a TensorFlow build without it)."""
    try:
        if int(os.environ.get("TF_CPP_MIN_LOG_LEVEL") or 0) < 1:
            return False
    except ValueError:
        return False
    try:
        import tensorflow as tf
        libs = glob.glob(os.path.join(os.path.dirname(tf.__file__),
                                      "libtensorflow_framework.so*"))
        if not libs:
            return False
        with open(libs[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            end = m.find(_SYMBOL_TAIL)  # the mangled name holds absl's version: find it
            found = (_SET_MIN_LOG_LEVEL.search(m[max(0, end - 40):end + len(_SYMBOL_TAIL)])
                     if end >= 0 else None)
            name = found.group().decode() if found else None
        if name is None:
            return False
        getattr(ctypes.CDLL(libs[0]), name)(ctypes.c_int(_ABSL_WARNING))
        return True
    except (OSError, AttributeError, ValueError, ImportError):
        return False


def apply_precision(value: str) -> None:
    """Set TensorFlow's bf16 rewrite for this process (before any model graph is built).
    Idempotent; a second, different precision in the same process is refused."""
    global _applied
    check_runnable(value)
    with _lock:
        if _applied == value:
            return
        if _applied is not None:
            raise PrecisionError(f"this process already runs the model in {_applied}; "
                                 f"{value} needs a process of its own (TensorFlow's "
                                 f"{GRAPPLER_OPTION} option is process-global)")
        import tensorflow as tf
        if value == "bf16":
            quiet_native_info_logs()
        tf.config.optimizer.set_experimental_options({GRAPPLER_OPTION: value == "bf16"})
        _applied = value


def applied_precision() -> str | None:
    """What `apply_precision` set in this process (None: not yet)."""
    return _applied
