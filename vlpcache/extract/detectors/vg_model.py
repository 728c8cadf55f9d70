"""The Visual Genome Faster R-CNN of bottom-up attention, on torchvision ops (no detectron2).

ResNet-101 C4 with an attribute head, trained on Visual Genome's 1,600 object and 400 attribute
classes: the model of bottom-up attention (Anderson et al. 2018) as py-bottom-up-attention converted
it to PyTorch and `unc-nlp/frcnn-vg-finetuned` publishes it. Module and parameter names are that
checkpoint's keys, so its state dict loads as it is; the reference implementation is transformers'
LXMERT demo (examples/research_projects/lxmert/modeling_frcnn.py), which bench/vg_reference.py
compares this module with.

    image (B, 3, H, W): BGR, minus PIXEL_MEANS_BGR, zero-padded
      backbone            stem (7x7/2 conv, caffe's 3x3/2 max pool), res2-res4 -> res4 (B, 1024, H/16, W/16)
      proposal_generator  3x3 conv (512) -> objectness and box deltas of 12 anchors per cell (64-512 px,
                          ratios 1:2, 1:1, 2:1) -> per image: best pre_nms by objectness, clipped, NMS,
                          best post_nms: the proposals (P, 4)
      roi_heads           RoIPool 14x14 at 1/16 -> res5 (stride 1, dilation 2) -> mean -> feature (R, 2048)
        box_predictor     class logits (R, 1601; background last), box deltas (R, 1600 * 4), attribute
                          logits (R, 401; "no attribute" last) from [feature, embedding of the best class]

Batch norms are frozen (FrozenBatchNorm2d: the running statistics of the checkpoint, which also drops
the `num_batches_tracked` entries it may carry).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import FrozenBatchNorm2d, nms, roi_pool

from vlpcache.extract.detectors.state_dicts import read_state_dict

OBJECT_CLASSES = 1600  # Visual Genome objects; the class logits add background as the last column
ATTRIBUTE_CLASSES = 400  # Visual Genome attributes; the attribute logits add "none" as the last column
FEATURE_DIM = 2048  # res5's channels: the region feature
STRIDE = 16  # of res4, the map proposals and regions are pooled from
POOLED = 14  # RoIPool output side; res5 keeps it (stride 1, dilated)
ANCHOR_SIZES = (64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
RES_BLOCKS = {"res2": 3, "res3": 4, "res4": 23, "res5": 3}  # ResNet-101
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)  # caffe's; inputs are 0-255 BGR minus these, not scaled
RPN_CODER = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16))
ROI_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000.0 / 16))


class ConvNorm(nn.Conv2d):
    """A bias-free convolution and its frozen batch norm, named `<conv>.norm` as detectron2 names it."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """1x1 (carrying the stride, as MSRA's and caffe's ResNets do) -> 3x3 (dilated) -> 1x1, plus the shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride) if cin != cout else None
        self.conv1 = ConvNorm(cin, width, 1, stride)
        self.conv2 = ConvNorm(width, width, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(width, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(F.relu_(self.conv2(F.relu_(self.conv1(x)))))
        return F.relu_(out + (x if self.shortcut is None else self.shortcut(x)))


def res_stage(name: str, cin: int, width: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
    blocks = [Bottleneck(cin, width, cout, stride, dilation)]
    blocks += [Bottleneck(cout, width, cout, 1, dilation) for _ in range(RES_BLOCKS[name] - 1)]
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # caffe's max pool: no padding, the last window may run past the edge (ceil_mode)
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Stem()
        self.res2 = res_stage("res2", 64, 64, 256, stride=1)
        self.res3 = res_stage("res3", 256, 128, 512, stride=2)
        self.res4 = res_stage("res4", 512, 256, 1024, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(images))))  # (B, 1024, H/16, W/16)


def cell_anchors(sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS) -> torch.Tensor:
    """(len(sizes) * len(ratios), 4) anchors centred on 0, size-major; ratio = height / width."""
    anchors = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size**2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


class AnchorGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        # a parameter in the checkpoint (a ParameterList, as the reference keeps it); never trained here
        self.cell_anchors = nn.ParameterList([nn.Parameter(cell_anchors(), requires_grad=False)])

    def grid(self, height: int, width: int) -> torch.Tensor:
        """(height * width * A, 4) anchors of a res4 map: cell-major, anchor-minor, in input pixels."""
        base = self.cell_anchors[0]
        xs = torch.arange(0, width * STRIDE, step=STRIDE, dtype=torch.float32, device=base.device)  # (W,)
        ys = torch.arange(0, height * STRIDE, step=STRIDE, dtype=torch.float32, device=base.device)  # (H,)
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        shifts = torch.stack((x, y, x, y), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
        return (shifts + base.float().view(1, -1, 4)).reshape(-1, 4)


class RpnHead(nn.Module):
    def __init__(self, cin: int = 1024, hidden: int = 512, anchors: int = len(ANCHOR_SIZES) * len(ASPECT_RATIOS)):
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden, anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(hidden, anchors * 4, kernel_size=1)


class ProposalGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor_generator = AnchorGenerator()
        self.rpn_head = RpnHead()

    def forward(self, res4: torch.Tensor, image_sizes: list[tuple[int, int]], pre_nms: int, post_nms: int,
                nms_iou: float) -> list[torch.Tensor]:
        """Per image, its proposals (P, 4) in input pixels, best objectness first (float32)."""
        hidden = F.relu(self.rpn_head.conv(res4))
        logits = self.rpn_head.objectness_logits(hidden)  # (B, A, h, w)
        deltas = self.rpn_head.anchor_deltas(hidden)  # (B, A * 4, h, w)
        B, A, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(B, -1).float()  # (B, h*w*A), cell-major as the anchors
        deltas = deltas.view(B, A, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4).float()  # (B*h*w*A, 4)
        anchors = self.anchor_generator.grid(h, w).repeat(B, 1)  # (B*h*w*A, 4)
        boxes = RPN_CODER.decode_single(deltas, anchors).view(B, -1, 4)  # (B, h*w*A, 4)
        logits, order = logits.sort(dim=1, descending=True)  # (B, h*w*A) each
        top = min(pre_nms, logits.shape[1])
        return [best_proposals(boxes[b, order[b, :top]], logits[b, :top], size, post_nms, nms_iou)
                for b, size in enumerate(image_sizes)]


def best_proposals(boxes: torch.Tensor, logits: torch.Tensor, size: tuple[int, int], post_nms: int,
                   nms_iou: float) -> torch.Tensor:
    """boxes (K, 4) sorted by objectness logits (K,): clipped to the image (h, w), empty ones dropped,
    NMS, the best post_nms."""
    h, w = size
    boxes = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), dim=1)  # (K, 4)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, logits = boxes[nonempty], logits[nonempty]
    keep = nms(boxes, logits, nms_iou)[:post_nms]
    order = logits[keep].sort(descending=True).indices  # nms keeps them sorted; ties as the reference orders them
    return boxes[keep[order]]


class BoxPredictor(nn.Module):
    def __init__(self, dim: int = FEATURE_DIM):
        super().__init__()
        self.cls_score = nn.Linear(dim, OBJECT_CLASSES + 1)
        self.bbox_pred = nn.Linear(dim, OBJECT_CLASSES * 4)
        self.cls_embedding = nn.Embedding(OBJECT_CLASSES + 1, dim // 8)
        self.fc_attr = nn.Linear(dim + dim // 8, dim // 4)
        self.attr_score = nn.Linear(dim // 4, ATTRIBUTE_CLASSES + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (R, 2048) -> class logits (R, 1601), box deltas (R, 6400), attribute logits (R, 401)."""
        class_logits = self.cls_score(features)
        best_class = class_logits.argmax(dim=-1)  # (R,) background included, as it was trained
        hidden = torch.cat([features, self.cls_embedding(best_class)], dim=-1)  # (R, 2048 + 256)
        attribute_logits = self.attr_score(F.relu(self.fc_attr(hidden)))
        return class_logits, self.bbox_pred(features), attribute_logits


class RoiHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.res5 = res_stage("res5", 1024, 512, FEATURE_DIM, stride=1, dilation=2)
        self.box_predictor = BoxPredictor()

    def pooled_features(self, res4: torch.Tensor, rois: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """rois (R, 5) as (image index, x1, y1, x2, y2) in input pixels -> their features (R, 2048), `chunk`
        regions at a time through res5 (R x 2048 x 14 x 14 activations at once would not fit)."""
        pooled = []
        for part in rois.split(chunk):
            x = roi_pool(res4, part, (POOLED, POOLED), spatial_scale=1.0 / STRIDE)  # (r, 1024, 14, 14)
            pooled.append(self.res5(x).mean(dim=(2, 3)))  # (r, 2048)
        return torch.cat(pooled) if pooled else res4.new_zeros((0, FEATURE_DIM))


class VgFasterRCNN(nn.Module):
    """The network; vg.py's VgDetector runs it (preprocessing, selection of regions)."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.proposal_generator = ProposalGenerator()
        self.roi_heads = RoiHeads()


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` if it has VgFasterRCNN's keys and shapes, else ValueError saying how not."""
    # the reference loader's renaming of TF-era names; FrozenBatchNorm2d ignores num_batches_tracked
    state = {k.replace("gamma", "weight").replace("beta", "bias"): v for k, v in read_state_dict(path).items()
             if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VgFasterRCNN().state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or reshaped:
        example = ", ".join((missing + unexpected + reshaped)[:3])
        raise ValueError(f"not the vg detector's state dict ({len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(reshaped)} of another shape, e.g. {example})")
    return state
