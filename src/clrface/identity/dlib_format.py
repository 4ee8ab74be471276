"""Reader for dlib's binary ``serialize()`` format, enough for ``dlib_face_recognition_resnet_model_v1.dat``.

Port of the stream layout only (no code) of dlib (https://github.com/davisking/dlib, commit
3d40bf5790ca9073c160cebb898800d9f33e12ab, Boost Software License 1.0):

* ``dlib/serialize.h``: integers are one control byte (low nibble = number of little-endian payload bytes,
  bit 0x80 = negative) plus payload; ``float``/``double`` are an int64 mantissa and an int16 exponent
  (value = mantissa * 2**exponent; exponents 32000/32001/32002 are +inf/-inf/nan); ``bool`` is the ASCII
  character '0'/'1'; ``std::string`` is an integer length plus raw bytes.
* ``dlib/cuda/tensor.h``: ``resizable_tensor`` = int version 2, four int64 dims (n, k, nr, nc), raw float32 LE;
  ``alias_tensor`` = int version 1 plus the four dims (a view into a layer's ``params`` tensor).
* ``dlib/dnn/core.h``: ``add_loss_layer`` = version 1, loss details, subnetwork; ``add_layer`` (version 2)
  writes its *subnetwork first*, then its layer details, three bools and the tensors x_grad, cached_output,
  params_grad; the bottom ``add_layer`` over the input layer (version 2 or 3) writes the input layer, the
  layer details, three bools and x_grad, cached_output, grad_final (and an int if version 3);
  ``add_tag_layer``/``add_skip_layer`` write version 1 and their subnetwork only.
* ``dlib/dnn/layers.h``, ``input.h``, ``loss.h``: the detail records of con_, bn_ (bn_con2), affine_, relu_,
  max_pool_, avg_pool_, add_prev_, fc_, input_rgb_image_sized, loss_metric_.

Because tag/skip layers carry no name in the stream, the caller supplies the network's wrapper sequence
(``spec``), top to bottom, as in the C++ type (see ``facerec.dlib_resnet_spec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clrface.errors import ClrfaceError


class DlibFormatError(ClrfaceError):
    """A file that does not follow the expected dlib serialization layout."""


_SPECIAL_EXP = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.b = data
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {what} at byte {self.pos}")

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.b):
            raise self.fail("unexpected end of file")
        out = self.b[self.pos : self.pos + n]
        self.pos += n
        return out

    def int_(self) -> int:
        ctrl = self.raw(1)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        v = int.from_bytes(self.raw(size), "little")
        return -v if ctrl & 0x80 else v

    def float_(self) -> float:
        if self.b[self.pos] & 0x70:
            raise self.fail("old ASCII float encoding is not supported")
        mant, exp = self.int_(), self.int_()
        if exp in _SPECIAL_EXP:
            return _SPECIAL_EXP[exp]
        return float(mant) * 2.0**exp

    def bool_(self) -> bool:
        c = self.raw(1)
        if c not in (b"0", b"1"):
            raise self.fail(f"bad bool {c!r}")
        return c == b"1"

    def str_(self) -> str:
        n = self.int_()
        return self.raw(n).decode("latin-1")

    def tensor(self) -> np.ndarray:
        if (v := self.int_()) != 2:
            raise self.fail(f"tensor version {v} != 2")
        shape = tuple(self.int_() for _ in range(4))
        count = int(np.prod(shape))
        arr = np.frombuffer(self.raw(4 * count), dtype="<f4").astype(np.float32)
        return arr.reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        if (v := self.int_()) != 1:
            raise self.fail(f"alias_tensor version {v} != 1")
        return tuple(self.int_() for _ in range(4))  # type: ignore[return-value]


@dataclass
class DlibLayer:
    """One computational layer: ``kind`` in {con, bn, affine, relu, max_pool, avg_pool, add_prev, fc}."""

    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNet:
    """Parsed network: ``layers`` top (next to the loss) to bottom (next to the input), tags omitted."""

    loss: dict[str, Any]
    input: dict[str, Any]
    layers: list[DlibLayer]


def _read_details(r: _Reader) -> DlibLayer:
    version = r.str_()
    if version in ("con_4", "con_5", "con_6"):
        params = r.tensor().reshape(-1)
        num_filters, nr, nc = r.int_(), r.int_(), r.int_()
        sy, sx, py, px = r.int_(), r.int_(), r.int_(), r.int_()
        fshape, bshape = r.alias(), r.alias()
        for _ in range(4):  # learning-rate / weight-decay multipliers
            r.float_()
        use_bias = r.bool_() if version in ("con_5", "con_6") else True
        if version == "con_6":
            r.bool_()  # use_relu: a fused-relu flag of newer dlib, never set in this file
        nw = int(np.prod(fshape))
        w = params[:nw].reshape(fshape)
        arrays = {"weight": w}
        if use_bias:
            arrays["bias"] = params[nw : nw + int(np.prod(bshape))].copy()
        meta = dict(num_filters=num_filters, kernel=(nr, nc), stride=(sy, sx), padding=(py, px))
        return DlibLayer("con", meta, arrays)
    if version in ("bn_con2", "bn_fc2"):
        params = r.tensor().reshape(-1)
        gshape, bshape = r.alias(), r.alias()
        r.tensor(), r.tensor()  # batch means / invstds of the last training batch
        running_means, running_vars = r.tensor().reshape(-1), r.tensor().reshape(-1)
        r.int_(), r.int_()  # num_updates, running_stats_window_size
        for _ in range(4):
            r.float_()
        eps = r.float_()
        ng = int(np.prod(gshape))
        gamma, beta = params[:ng], params[ng : ng + int(np.prod(bshape))]
        # dlib's affine_(const bn_&) conversion: the layer the C++ anet_type actually runs.
        scale = gamma / np.sqrt(running_vars + eps)
        shift = beta - scale * running_means
        return DlibLayer("affine", {"from": version, "eps": eps},
                         {"weight": scale.astype(np.float32), "bias": shift.astype(np.float32)})
    if version in ("affine_", "affine_2"):
        params = r.tensor().reshape(-1)
        gshape, _ = r.alias(), r.alias()
        r.int_()  # mode
        if version == "affine_2" and r.bool_():
            return DlibLayer("identity")
        ng = int(np.prod(gshape))
        return DlibLayer("affine", {"from": version}, {"weight": params[:ng].copy(), "bias": params[ng:].copy()})
    if version in ("relu_", "relu_2"):
        if version == "relu_2" and r.bool_():
            return DlibLayer("identity")
        return DlibLayer("relu")
    if version in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int_() for _ in range(6))
        return DlibLayer(version[:-2], dict(kernel=(nr, nc), stride=(sy, sx), padding=(py, px)))
    if version == "add_prev_":
        return DlibLayer("add_prev")
    if version in ("fc_2", "fc_3"):
        num_outputs, num_inputs = r.int_(), r.int_()
        params = r.tensor().reshape(-1)
        wshape, bshape = r.alias(), r.alias()
        bias_mode = r.int_()
        for _ in range(4):
            r.float_()
        use_bias = r.bool_() if version == "fc_3" else True
        nw = int(np.prod(wshape))
        # dlib stores W as [num_inputs, num_outputs] and computes x @ W.
        arrays = {"weight": params[:nw].reshape(num_inputs, num_outputs).T.copy()}
        if bias_mode == 0 and use_bias:  # FC_HAS_BIAS == 0
            arrays["bias"] = params[nw : nw + int(np.prod(bshape))].copy()
        return DlibLayer("fc", {"num_outputs": num_outputs, "num_inputs": num_inputs}, arrays)
    raise r.fail(f"unsupported layer record {version!r}")


def _read_input(r: _Reader) -> dict[str, Any]:
    version = r.str_()
    if version != "input_rgb_image_sized":
        raise r.fail(f"unsupported input layer {version!r}")
    avg = (r.float_(), r.float_(), r.float_())
    nr, nc = r.int_(), r.int_()
    return {"kind": version, "avg_rgb": avg, "size": (nr, nc)}


def parse_dlib_net(path: str | Path, spec: list[str]) -> DlibNet:
    """Parse a dlib ``add_loss_layer<...>`` file.

    spec: the wrapper chain below the loss, top to bottom; each entry is ``"layer"`` (an ``add_layer``),
    ``"tag"`` or ``"skip"``; the last entry must be ``"layer"`` (the one over the input layer).
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), str(path))
    if (v := r.int_()) != 1:
        raise r.fail(f"add_loss_layer version {v} != 1")
    loss_version = r.str_()
    loss: dict[str, Any] = {"kind": loss_version}
    if loss_version == "loss_metric_2":
        loss["margin"], loss["dist_thresh"] = r.float_(), r.float_()
    elif loss_version != "loss_metric_":
        raise r.fail(f"unsupported loss {loss_version!r}")

    # Down the chain: every wrapper writes its version before its subnetwork.
    versions = []
    for i, kind in enumerate(spec):
        v = r.int_()
        ok = {"layer": (1, 2), "tag": (1,), "skip": (1,)}[kind] if i < len(spec) - 1 else (2, 3)
        if v not in ok:
            raise r.fail(f"spec entry {i} ({kind}): version {v} not in {ok}")
        versions.append(v)

    inp = _read_input(r)
    layers: list[DlibLayer] = []
    # Back up the chain: only add_layers write anything after their subnetwork.
    for i in range(len(spec) - 1, -1, -1):
        if spec[i] != "layer":
            continue
        layers.append(_read_details(r))
        r.bool_(), r.bool_(), r.bool_()
        r.tensor(), r.tensor()  # x_grad, cached_output
        if i == len(spec) - 1:
            r.tensor()  # grad_final
            if versions[i] == 3:
                r.int_()  # _sample_expansion_factor
        elif versions[i] == 2:
            r.tensor()  # params_grad
    if r.pos != len(r.b):
        raise r.fail(f"{len(r.b) - r.pos} trailing bytes")
    layers.reverse()
    return DlibNet(loss=loss, input=inp, layers=layers)

