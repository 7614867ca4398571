"""Run in the Ultralytics tool environment (requirements-yolov5.txt), not in mzconvert's: a real YOLOv5 graph
(anchors, objectness) built by the `yolov5` package from its model YAML and exported to ONNX as its export.py
does: the fused model, Detect in export mode, torch.onnx.export at opset 12 with constant folding, then its
stride and class names written into metadata_props.

usage: python tests/yolov5_export.py MODEL.yaml IMAGE_DIR  (writes MODEL.onnx in the working folder)

Its one difference from export.py: the TorchScript exporter is asked for by name (dynamo=False). export.py
calls torch.onnx.export without it, which torch >= 2.9 takes to the torch.export route (and onnxscript);
the YOLOv5 ONNX files users have were made by the TorchScript exporter, the graph tested here.

As in ultralytics_export.py, the weights are made to carry signal without training: batch-norm statistics
measured on the images (its with_image_statistics), objectness and class biases that leave a few (anchor, class) scores above 0.25 on
some images. The class names are COCO's, as the released YOLOv5 models carry them.
"""

import sys
from pathlib import Path

import onnx
import torch
import ultralytics
import yaml
import yolov5
from ultralytics_export import SIZE, with_image_statistics  # this folder's: run as a script from it
from yolov5.models.yolo import Detect, Model

OBJECT_BIAS, CLASS_BIAS = -2.0, -6.0


def main(config: str, images: Path) -> None:
    torch.manual_seed(0)
    model = Model(str(Path(yolov5.__file__).parent / "models" / config), ch=3, nc=80)
    coco = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml").read_text())
    model.names = [coco["names"][i] for i in range(80)]
    with_image_statistics(model, images)
    with torch.no_grad():
        head = model.model[-1]
        for conv in head.m:  # per anchor: x, y, w, h, objectness, then the classes
            bias = conv.bias.view(head.na, head.no)
            bias[:, 4].fill_(OBJECT_BIAS)
            bias[:, 5:].fill_(CLASS_BIAS)
    export_onnx(model, Path(config).with_suffix(".onnx").name)


def export_onnx(model, target: str) -> None:
    """`model` as YOLOv5's export.py writes it to ONNX (TorchScript exporter: see the module's docstring)."""
    model = model.fuse()
    for module in model.modules():
        if isinstance(module, Detect):
            module.inplace, module.dynamic, module.export = True, False, True
    image = torch.zeros(1, 3, SIZE, SIZE)
    model(image)  # export.py's dry run (makes the grids)
    torch.onnx.export(model, image, target, opset_version=12, do_constant_folding=True, input_names=["images"],
                      output_names=["output0"], dynamo=False)
    exported = onnx.load(target)
    for key, value in {"stride": int(max(model.stride)), "names": model.names}.items():
        meta = exported.metadata_props.add()
        meta.key, meta.value = key, str(value)
    onnx.save(exported, target)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
