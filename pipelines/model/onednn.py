"""Whether TensorFlow runs with oneDNN (Intel MKL-DNN) kernels in this process, and why.

TensorFlow 2.20 on x86 Linux turns oneDNN on by default only on CPUs with AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX; TF_ENABLE_ONEDNN_OPTS=1 forces it on (any x86 CPU) and
=0 forces it off. oneDNN changes which fused kernels the graph optimizer picks, so a graph
can behave differently between machines (see pipelines/model/efficientnet_lite.py), and it is
usually the faster path where the CPU has those features (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

ENV_VAR = "TF_ENABLE_ONEDNN_OPTS"
# CPU flags (as /proc/cpuinfo names them) for which TensorFlow turns oneDNN on by default.
DEFAULT_ON_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class OneDnnStatus:
    enabled: bool
    reason: str          # one line a person can act on

    def describe(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


def proc_cpu_flags() -> set[str]:
    """The real CPU's flags (/proc/cpuinfo; empty where it does not read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _tensorflow_says() -> bool | None:
    """TensorFlow's own answer (IsMklEnabled), or None when this build does not expose it."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def onednn_status(ask_tensorflow: bool = True) -> OneDnnStatus:
    """oneDNN on or off for TensorFlow in this process, with the reason (env var or CPU flags)."""
    env = os.environ.get(ENV_VAR)
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64", "i386", "i686")
    if env is not None and env.strip().lower() in ("1", "true"):
        expected, reason = x86, f"{ENV_VAR}={env}" + ("" if x86 else f", but {machine} is not x86")
    elif env is not None and env.strip().lower() in ("0", "false"):
        expected, reason = False, f"{ENV_VAR}={env}"
    else:
        present = sorted(proc_cpu_flags() & set(DEFAULT_ON_FLAGS))
        expected = x86 and bool(present)
        reason = (f"TensorFlow's default on this CPU: it has {', '.join(present)}" if expected
                  else "TensorFlow's default on this CPU: no AVX512_VNNI / AVX512_BF16 / "
                       "AVX_VNNI / AMX")
        reason += f"; set {ENV_VAR}=0 or 1 to choose"
    actual = _tensorflow_says() if ask_tensorflow else None
    if actual is not None and actual != expected:
        reason = f"TensorFlow reports it {'on' if actual else 'off'} ({reason})"
        expected = actual
    return OneDnnStatus(enabled=expected, reason=reason)
