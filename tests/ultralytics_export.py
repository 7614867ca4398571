"""Run in the Ultralytics tool environment (requirements-ultralytics.txt), not in mzconvert's: a real YOLO
graph built from the package's model YAML and exported to ONNX as `yolo export format=onnx` does.

usage: python tests/ultralytics_export.py MODEL.yaml IMAGE_DIR [--nms] [--end2end] [--opset N] [--dynamic]
[--checkpoint]
(writes MODEL.onnx in the working folder, and the same weights exported otherwise: with --nms MODEL-nms.onnx,
ending in their own NMS: nms=True; with --end2end MODEL-e2e.onnx, an NMS-free head's own top-K selection:
nms=False; with --opset N MODEL-opsetN.onnx, at that opset, as users export for older runtimes: opset=12; with
--dynamic MODEL-dynamic.onnx, its batch and image size dynamic, exported at an image size that is not square:
dynamic=True, imgsz=(DYNAMIC_SIZE)); with --checkpoint MODEL.pt, the checkpoint Ultralytics saves (a pickle of its
model classes, as `yolo train` leaves best.pt))

No trained weights can be had here, and a freshly initialised network computes the same output for every
image (its batch-norm statistics are 0 and 1, its class biases -11). So the weights are made to carry
signal the way a trained network's do, without training: batch-norm statistics measured on the images
(activations neither vanish nor explode), class-branch logits with a spread and bias that leave about
0.1 % of (anchor, class) scores above 0.25. The graph, its ops, layout and metadata are Ultralytics' own.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ultralytics import RTDETR, YOLO

SIZE = 320
DYNAMIC_SIZE = (256, 320)  # height, width
CLASS_BIAS, CLASS_GAIN = -8.0, 2.0
QUERY_CLASS_BIAS = -5.5  # RT-DETR scores its 300 queries, not thousands of cells: some of them above 0.3


def main(config: str, images: Path, nms: bool, end2end: bool, opset: int | None, dynamic: bool,
         checkpoint: bool) -> None:
    torch.manual_seed(0)
    yolo = RTDETR(config) if Path(config).stem.startswith("rtdetr") else YOLO(config)
    model = yolo.model
    with_image_statistics(model, images)
    head = model.model[-1]
    if head.__class__.__name__ == "Pose":
        model.names = {0: "person"}  # as Ultralytics' pose models name their one class
    with torch.no_grad():  # an NMS-free head's one-to-one branch too (YOLO26, YOLOv10)
        for branch in [*getattr(head, "cv3", []), *getattr(head, "one2one_cv3", [])]:
            branch[-1].bias.fill_(CLASS_BIAS)
            branch[-1].weight.mul_(CLASS_GAIN)
        for layer in getattr(head, "dec_score_head", [])[-1:]:  # RT-DETR's last decoder layer: its queries' scores
            layer.bias.fill_(QUERY_CLASS_BIAS)
            layer.weight.mul_(CLASS_GAIN)
    stem = Path(config).stem
    if nms:
        Path(yolo.export(format="onnx", imgsz=SIZE, nms=True)).rename(f"{stem}-nms.onnx")
    if end2end:
        Path(yolo.export(format="onnx", imgsz=SIZE, nms=False)).rename(f"{stem}-e2e.onnx")
    if opset:
        Path(yolo.export(format="onnx", imgsz=SIZE, opset=opset)).rename(f"{stem}-opset{opset}.onnx")
    if dynamic:
        Path(yolo.export(format="onnx", imgsz=DYNAMIC_SIZE, dynamic=True)).rename(f"{stem}-dynamic.onnx")
    if checkpoint:
        yolo.save(f"{stem}.pt")
    yolo.export(format="onnx", imgsz=SIZE)  # the package's defaults otherwise: opset, onnxslim


def with_image_statistics(model: torch.nn.Module, images: Path) -> None:
    """`model`'s batch-norm statistics measured on the first 32 images of the folder (SIZE x SIZE), then eval
    mode: activations neither vanish nor explode, as a trained network's."""
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:32]
    batch = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE)), np.float32)
                                          / 255).permute(2, 0, 1) for p in files])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the plain average over the batch
    model.train()
    with torch.no_grad():
        model(batch)
    model.eval()

if __name__ == "__main__":
    options = sys.argv[3:]
    main(sys.argv[1], Path(sys.argv[2]), "--nms" in options, "--end2end" in options,
         int(options[options.index("--opset") + 1]) if "--opset" in options else None, "--dynamic" in options,
         "--checkpoint" in options)
