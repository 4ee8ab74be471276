"""ArcFace IResNet-50/100 backbones (insightface ``arcface_torch``) with a differentiable FFHQ -> 112 px warp.

Port of the architecture of insightface (https://github.com/deepinsight/insightface, commit
04a433f154de30ff8604d78f73f2b6af5822f71c, ``recognition/arcface_torch/backbones/iresnet.py``, MIT License),
re-written; parameter names follow insightface so its ``backbone.pth`` state dicts load unchanged.
The 112x112 five-point template is insightface's ``arcface_dst`` (``python-package/insightface/utils/face_align.py``).

No weights ship with clrface: :func:`load_arcface` takes a local ``.pth`` state dict path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrface.errors import ClrfaceError
from clrface.identity.facerec import similarity_fit, warp_chip

ARCFACE_SIZE = 112

# insightface arcface_dst (pixel coordinates of a 112 px chip, pixel centres at integers):
# image-left eye, image-right eye, nose tip, mouth left, mouth right.
ARCFACE_TEMPLATE5 = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

# The same five points (eye centres = mean of dlib 68-point eye contours, nose tip = point 30, mouth corners
# = points 48/54) on FFHQ-aligned crops, unit coordinates (pixel i of an S-px crop at (i+0.5)/S): mean over
# the 950 detected faces of 1,000 random faces128/train crops upsampled x4, mirror-symmetrised
# (``benchmarks/facerec_parity.py --fit-landmarks 1000``). The raw mean has the nose tip at x = 0.442 (the
# CelebA crops lean to one side); the FFHQ recipe itself is mirror-symmetric, and it puts eye_avg +
# 0.1 * eye_to_mouth at the crop centre, as here (y = 0.4725 + 0.1 * 0.2724 = 0.4997).
FFHQ_ARCFACE5 = (
    (0.3868, 0.4725),
    (0.6132, 0.4725),
    (0.5000, 0.6099),
    (0.4003, 0.7449),
    (0.5997, 0.7449),
)


class IBasicBlock(nn.Module):
    """Pre-activation-style block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet: [B,3,112,112] RGB in [-1,1] -> [B,num_features] (unnormalised)."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (c, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = [IBasicBlock(cin if j == 0 else c, c, 2 if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = c
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        # insightface initialisation; matters only for random-weight tests.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet50(num_features: int = 512) -> IResNet:
    """IResNet-50 (blocks 3, 4, 14, 3)."""
    return IResNet((3, 4, 14, 3), num_features)


def iresnet100(num_features: int = 512) -> IResNet:
    """IResNet-100 (blocks 3, 13, 30, 3)."""
    return IResNet((3, 13, 30, 3), num_features)


def ffhq_arcface_affine(size: int = ARCFACE_SIZE) -> Tensor:
    """Fixed [2,3] affine from arcface chip pixel (x, y) to unit FFHQ-crop coordinates (float64).

    insightface estimates the similarity image -> template (Umeyama); we fit the same least squares in the
    template -> image direction, which is what sampling needs.
    """
    tpl = torch.tensor(ARCFACE_TEMPLATE5, dtype=torch.float64) * (size / ARCFACE_SIZE)
    return similarity_fit(tpl, torch.tensor(FFHQ_ARCFACE5, dtype=torch.float64))


class ArcFaceRecognizer(nn.Module):
    """ArcFace embedding of FFHQ-aligned crops, same interface as ``DlibFaceRecognizer``.

    images: [B,3,H,W] RGB in [-1,1] (the range insightface normalises to), FFHQ-aligned, any size.
    """

    def __init__(self, backbone: IResNet):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("ffhq_affine", ffhq_arcface_affine().float(), persistent=False)

    def chip(self, images: Tensor) -> Tensor:
        """FFHQ crop -> arcface 112 px chip [B,3,112,112] in [-1,1] (differentiable, black outside)."""
        return warp_chip(images, self.ffhq_affine.double(), ARCFACE_SIZE)

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised embedding [B,num_features] (differentiable)."""
        x = self.chip(images.to(self.backbone.conv1.weight.dtype))
        return F.normalize(self.backbone(x), dim=-1)

    forward = embed


def load_arcface(
    path: str | Path,
    arch: str = "iresnet100",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ArcFaceRecognizer:
    """Load an insightface ``arcface_torch`` backbone state dict (``backbone.pth``) into a frozen recognizer.

    arch: "iresnet50" or "iresnet100". Raises ClrfaceError when the file is missing or does not fit the arch.
    """
    path = Path(path)
    builders = {"iresnet50": iresnet50, "iresnet100": iresnet100}
    if arch not in builders:
        raise ClrfaceError(f"unknown ArcFace architecture {arch!r} (choose from {', '.join(builders)})")
    if not path.is_file():
        raise ClrfaceError(f"{path}: ArcFace weights not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise ClrfaceError(f"{path}: not a readable state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    num_features = state["fc.weight"].shape[0] if "fc.weight" in state else 512
    net = builders[arch](num_features)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ClrfaceError(f"{path}: does not match {arch} ({str(e).splitlines()[0]})") from None
    rec = ArcFaceRecognizer(net).eval().requires_grad_(False)
    return rec.to(device=device, dtype=dtype)
