"""Run in the Ultralytics tool environment (requirements-ultralytics.txt), not in mzconvert's: a real YOLO
graph built from the package's model YAML and exported to ONNX as `yolo export format=onnx` does.

usage: python tests/ultralytics_export.py MODEL.yaml IMAGE_DIR [--nms]  (writes MODEL.onnx in the working folder;
with --nms also MODEL-nms.onnx, the same weights exported ending in their own NMS: nms=True)

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
from ultralytics import YOLO

SIZE = 320
CLASS_BIAS, CLASS_GAIN = -8.0, 2.0


def main(config: str, images: Path, nms: bool) -> None:
    torch.manual_seed(0)
    yolo = YOLO(config)
    model = yolo.model
    with_image_statistics(model, images)
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(CLASS_BIAS)
            branch[-1].weight.mul_(CLASS_GAIN)
    if nms:
        Path(yolo.export(format="onnx", imgsz=SIZE, nms=True)).rename(f"{Path(config).stem}-nms.onnx")
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
    main(sys.argv[1], Path(sys.argv[2]), "--nms" in sys.argv[3:])
