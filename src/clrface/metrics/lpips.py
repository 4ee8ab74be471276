"""LPIPS (Zhang et al. 2018, Eq. 1) from the real weight files, and the error raised when a metric's weights are absent.

The network follows the ``lpips`` package (github.com/richzhang/PerceptualSimilarity, v0.1, BSD-2-Clause),
re-written here because that package imports torchvision, which this project does not install: the input
scaling layer (shift/scale per channel), the torchvision AlexNet/VGG16 ``features`` trunk cut after each ReLU
stage, channel-unit-normalised features, squared differences weighted by the learned 1x1 ``lin`` layers,
spatially averaged and summed over the five stages. Parameter names match the two files it reads:

* the backbone, torchvision's ImageNet checkpoint: ``alexnet-owt-7be5be79.pth`` (``vgg16-397923af.pth``), looked
  up in ``weights_dir`` and in ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``);
* the linear calibration, ``lpips/weights/v0.1/alex.pth`` (``vgg.pth``) of the ``lpips`` package, looked up in
  ``weights_dir`` and in the installed ``lpips`` package (located with importlib, never imported).

Nothing is downloaded; if a file is missing, ``MetricUnavailable`` names every path searched. LPIPS runs at the
images' own resolution (128 px for our faces; published BFR tables use 512 px), input in [-1, 1].
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from clrface.data.io import to_model_range
from clrface.errors import ClrfaceError
from clrface.identity.facerec import perceptual_distance
from clrface.metrics.meter import MeanMeter


class MetricUnavailable(ClrfaceError):
    """A metric whose network weights are not on disk; the message says which file to place where."""


# torchvision ``features`` layouts: (kind, args) per index; "C" conv(cin, cout, k, stride, pad), "R" ReLU, "M" maxpool.
_ALEX = [("C", (3, 64, 11, 4, 2)), ("R",), ("M",), ("C", (64, 192, 5, 1, 2)), ("R",), ("M",),
         ("C", (192, 384, 3, 1, 1)), ("R",), ("C", (384, 256, 3, 1, 1)), ("R",), ("C", (256, 256, 3, 1, 1)), ("R",)]
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]

NETS = {
    # net: (backbone file, lpips linear file, slice ends into ``features``, channels per stage)
    "alex": ("alexnet-owt-7be5be79.pth", "alex.pth", (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg": ("vgg16-397923af.pth", "vgg.pth", (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
}


def _alex_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    for spec in _ALEX:
        if spec[0] == "C":
            cin, cout, k, s, p = spec[1]
            layers.append(nn.Conv2d(cin, cout, k, s, p))
        elif spec[0] == "R":
            layers.append(nn.ReLU())
        else:
            layers.append(nn.MaxPool2d(3, 2))
    return nn.Sequential(*layers)


def _vgg_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, 1, 1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS distance ``d(a, b)`` for images [B,3,H,W] in [-1,1]; returns [B] (0 for identical inputs)."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; use one of {sorted(NETS)}")
        self.net_name = net
        _, _, self.ends, chns = NETS[net]
        self.features = _alex_features() if net == "alex" else _vgg_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def stages(self, x: Tensor) -> list[Tensor]:
        """Activations after each of the five ReLU stages."""
        h = (x - self.shift) / self.scale
        out, start = [], 0
        for end in self.ends:
            for i in range(start, end):
                h = self.features[i](h)
            out.append(h)
            start = end
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        dtype = self.shift.dtype
        fa, fb = self.stages(a.to(dtype)), self.stages(b.to(dtype))
        total = 0
        for lin, x, y in zip(self.lins, fa, fb):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((x - y).pow(2)).mean((1, 2, 3))
        return total


def _torch_hub_checkpoints() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def _lpips_package_weights() -> Path | None:
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1"


def lpips_weight_paths(net: str = "alex", weights_dir: str | Path | None = None) -> tuple[list[Path], list[Path]]:
    """Candidate paths, in search order, for the backbone and for the linear layers of ``net``."""
    backbone, lin, _, _ = NETS[net]
    dirs_b = ([Path(weights_dir)] if weights_dir else []) + [_torch_hub_checkpoints()]
    pkg = _lpips_package_weights()
    dirs_l = ([Path(weights_dir)] if weights_dir else []) + ([pkg] if pkg else [])
    return [d / backbone for d in dirs_b], [d / lin for d in dirs_l]


def load_lpips(net: str = "alex", weights_dir: str | Path | None = None, *,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LPIPS:
    """The LPIPS network with real weights, frozen, in eval mode.

    Raises ``MetricUnavailable`` naming the files to place (and where) when either weight file is missing.
    """
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; use one of {sorted(NETS)}")
    cand_b, cand_l = lpips_weight_paths(net, weights_dir)
    found_b = next((p for p in cand_b if p.is_file()), None)
    found_l = next((p for p in cand_l if p.is_file()), None)
    if found_b is None or found_l is None:
        backbone, lin, _, _ = NETS[net]
        missing = []
        if found_b is None:
            missing.append(f"{backbone} (torchvision's ImageNet {net} weights) at {cand_b[0]}")
        if found_l is None:
            missing.append(f"{lin} (lpips v0.1 linear layers, lpips/weights/v0.1/{lin} of the lpips package) at "
                           + (str(cand_l[0]) if weights_dir else "<folder>/" + lin + " and pass the folder as "
                              "weights_dir (--lpips-weights), or pip install lpips"))
        raise MetricUnavailable("place " + "; and ".join(missing))
    model = LPIPS(net)
    try:
        sb = torch.load(found_b, map_location="cpu", weights_only=True)
        sl = torch.load(found_l, map_location="cpu", weights_only=True)
        model.features.load_state_dict({k[len("features."):]: v for k, v in sb.items() if k.startswith("features.")})
        # lpips names them lin{k}.model.1.weight (index 0 is a dropout layer)
        model.lins.load_state_dict({f"{k}.weight": sl[f"lin{k}.model.1.weight"] for k in range(len(model.lins))})
    except (KeyError, RuntimeError, OSError) as e:
        raise MetricUnavailable(f"LPIPS weights {found_b} / {found_l} do not fit the {net} network: {e}") from None
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


class LPIPSMeter(MeanMeter):
    """Mean LPIPS over images: ``update(pred, gt) -> [B]``, ``compute() -> float``. pred, gt in [-1,1] or uint8."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(self._lpips)
        self.model = model

    @torch.no_grad()
    def _lpips(self, pred: Tensor, gt: Tensor) -> Tensor:
        p = next(self.model.parameters())
        return self.model(_as_float(pred).to(p.device), _as_float(gt).to(p.device)).double().cpu()


def _as_float(x: Tensor) -> Tensor:
    """uint8 [0,255] or float [-1,1] -> float32 [-1,1]."""
    return to_model_range(x, channels_last=False) if x.dtype == torch.uint8 else x.float()



class FacerecPerceptualMeter(MeanMeter):
    """Mean ``clrface.identity.facerec.perceptual_distance`` over images: our stated offline LPIPS substitute
    (LPIPS-style distance on the dlib ResNet's multi-layer features, unit layer weights, not learned), reported
    under its own name ``facerec_perceptual``, never as LPIPS. ``update(pred, gt) -> [B]``, ``compute() -> float``.
    """

    def __init__(self, fr: nn.Module) -> None:
        super().__init__(self._distance)
        self.fr = fr

    @torch.no_grad()
    def _distance(self, pred: Tensor, gt: Tensor) -> Tensor:
        p = next(self.fr.parameters())
        a = _as_float(pred).to(device=p.device, dtype=p.dtype)
        b = _as_float(gt).to(device=p.device, dtype=p.dtype)
        return perceptual_distance(self.fr, a, b).double().cpu()
