"""A tiny random-weight WD14-shaped booru tagger, saved as SmilingWolf's repositories ship one:
``model.onnx`` (input ``[batch, 448, 448, 3]`` float32 BGR 0-255, output one sigmoid score per
tag) and ``selected_tags.csv`` (``tag_id,name,category,count``).

The graph is a convolution, global average pooling, a linear layer and a sigmoid, written as
ONNX protobuf by hand: torch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``)
needs the ``onnx`` package for its last step (``_add_onnxscript_fn`` imports it), which is no
dependency of ours, while the wire format of the few messages used here is a page of code.
The field numbers are onnx.proto's.

The weights are small and the output biases chosen (:data:`TAGS`' scores), so that every image
gives the same tags on the same side of each threshold: tests know the tags to expect.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SIZE = 448
#: (name, category, score it gets): ratings 9, general 0, characters 4.
TAGS = [
    ("general", 9, 0.95), ("sensitive", 9, 0.1), ("questionable", 9, 0.02), ("explicit", 9, 0.01),
    ("1girl", 0, 0.97), ("solo", 0, 0.9), ("long_hair", 0, 0.75), ("blue_eyes", 0, 0.57),
    ("smile", 0, 0.45), ("^_^", 0, 0.4), ("hat", 0, 0.3), ("outdoors", 0, 0.15), ("dog", 0, 0.05),
    ("sky", 0, 0.1), ("tree", 0, 0.2), ("holding_umbrella", 0, 0.08), ("food", 0, 0.03),
    ("hatsune_miku_(vocaloid)", 4, 0.93), ("kaname_madoka", 4, 0.8), ("hakurei_reimu", 4, 0.2),
]  # fmt: skip
#: What it gives any image at the reference's thresholds, as prompts write them: the character
#: first, then the general tags by score; no rating, nor the character under 0.85.
PROMPT_TAGS = ["hatsune miku \\(vocaloid\\)", "1girl", "solo", "long hair", "blue eyes", "smile", "^_^"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _ints_attribute(name: str, values: list[int]) -> bytes:  # AttributeProto, type INTS (7)
    return _bytes(1, name) + b"".join(_int(8, v) for v in values) + _int(20, 7)


def _int_attribute(name: str, value: int) -> bytes:  # AttributeProto, type INT (2)
    return _bytes(1, name) + _int(3, value) + _int(20, 2)


def _node(op: str, inputs: list[str], output: str, *attributes: bytes) -> bytes:  # NodeProto
    fields = [_bytes(1, i) for i in inputs] + [_bytes(2, output), _bytes(3, output), _bytes(4, op)]
    return b"".join(fields + [_bytes(5, a) for a in attributes])


def _tensor(name: str, array: np.ndarray) -> bytes:  # TensorProto, FLOAT (1), raw little-endian data
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, 1) + _bytes(8, name) + _bytes(9, array.astype("<f4").tobytes())


def _value_info(name: str, dims: list[int | str]) -> bytes:  # ValueInfoProto of a float tensor
    shape = b"".join(_bytes(1, _bytes(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, 1) + _bytes(2, shape)))


def tagger_onnx(logits: np.ndarray, seed: int = 0, size: int = SIZE) -> bytes:
    """The model: NHWC -> conv 3x3/2 -> ReLU -> global average pool -> linear (bias ``logits``) -> sigmoid."""
    rng = np.random.default_rng(seed)
    channels = 4
    weights = {
        "conv.weight": rng.uniform(-1e-4, 1e-4, (channels, 3, 3, 3)),
        "conv.bias": np.zeros(channels),
        "fc.weight": rng.uniform(-5e-3, 5e-3, (len(logits), channels)),
        "fc.bias": logits,
    }
    nodes = [
        _node("Transpose", ["input"], "nchw", _ints_attribute("perm", [0, 3, 1, 2])),
        _node("Conv", ["nchw", "conv.weight", "conv.bias"], "conv", _ints_attribute("strides", [2, 2])),
        _node("Relu", ["conv"], "relu"),
        _node("GlobalAveragePool", ["relu"], "pooled"),
        _node("Flatten", ["pooled"], "features", _int_attribute("axis", 1)),
        _node("Gemm", ["features", "fc.weight", "fc.bias"], "logits", _int_attribute("transB", 1)),
        _node("Sigmoid", ["logits"], "output"),
    ]
    graph = b"".join(
        [_bytes(1, n) for n in nodes]
        + [_bytes(2, "tiny_wd14")]
        + [_bytes(5, _tensor(name, array)) for name, array in weights.items()]
        + [_bytes(11, _value_info("input", ["batch", size, size, 3]))]
        + [_bytes(12, _value_info("output", ["batch", len(logits)]))]
    )
    opset = _bytes(1, "") + _int(2, 17)  # OperatorSetIdProto: the default domain, opset 17
    return _int(1, 8) + _bytes(2, "sdbot-tests") + _bytes(7, graph) + _bytes(8, opset)  # ModelProto, IR 8


def save_tiny_tagger(folder: Path, size: int = SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    scores = np.array([score for _, _, score in TAGS])
    (folder / "model.onnx").write_bytes(tagger_onnx(np.log(scores / (1 - scores)), size=size))
    with (folder / "selected_tags.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _) in enumerate(TAGS):
            rows.writerow([100 + i, name, category, 1000 - i])
    return folder
