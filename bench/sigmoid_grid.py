"""What LiteRT's int8 LOGISTIC costs a SiLU network: the ONNX int8 (QDQ) variant of a built recipe verified as
built, and again with every sigmoid inside the graph on the grid LiteRT's int8 LOGISTIC must write (scale 1/256,
zero point -128: its largest value is 255/256, so x * sigmoid(x) comes out 0.4 % low for every x above 5, layer
after layer; ONNX Runtime's sigmoid output keeps its own range, [0, 1] in 255 steps). The rest of the model is
the same bytes, so the difference is the grid's alone: a paired measure, on the recipe's verify images, of how far
a TFLite int8 of the same model can be from its ONNX twin for this reason.

Usage: .venv/bin/python bench/sigmoid_grid.py RECIPE [--variant int8] [--build-dir build]
(after `mzconvert build RECIPE`: a recipe with an ONNX int8 variant and verify images, e.g. init's for a YOLO export)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def on_logistic_grid(model, folder: Path) -> tuple[Path, int]:
    """A copy of the QDQ `model` whose sigmoids inside the graph are quantized as LiteRT's int8 LOGISTIC writes
    them (codes of 1/256 from 0); how many."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    outputs = {o.name for o in graph.output}
    sigmoids = {n.output[0] for n in graph.node if n.op_type == "Sigmoid" and n.output[0] not in outputs}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    stored = {i.name: i for i in graph.initializer}
    moved = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in sigmoids:
            continue
        for pair in [node] + [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]:
            scale = f"{pair.name or pair.output[0]}_logistic_scale"  # a scale of its own: initializers are shared
            zero = f"{pair.name or pair.output[0]}_logistic_zero"
            dtype = numpy_helper.to_array(stored[pair.input[2]]).dtype
            graph.initializer.extend([numpy_helper.from_array(np.array(1 / 256, np.float32), scale),
                                      numpy_helper.from_array(np.array(0 if dtype == np.uint8 else -128, dtype), zero)])
            pair.input[1], pair.input[2] = scale, zero
        moved += 1
    target = folder / "on-logistic-grid.onnx"
    onnx.save(model, str(target))
    return target, moved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--variant", default="int8", help="an ONNX int8 variant of the recipe")
    parser.add_argument("--build-dir", default="build")
    args = parser.parse_args()
    import onnx

    from mzconvert.layout import built_stage_model, built_stage_result
    from mzconvert.recipe import load_recipe
    from mzconvert.stages.verify import verify_variant

    recipe = load_recipe(Path(args.recipe))
    build_root = Path(args.build_dir)
    artifact = built_stage_model(build_root, recipe, f"quantize/{args.variant}")
    references = sorted((build_root / recipe.name / "reference").glob("*/result.json"),
                        key=lambda p: p.stat().st_mtime)
    if artifact is None or artifact.suffix != ".onnx" or not references:
        sys.exit(f"{args.recipe}: no ONNX build of {args.variant} with verify images under {build_root}: "
                 f"run mzconvert build {args.recipe} --build-dir {build_root} first")
    reference = built_stage_result(build_root, recipe, f"reference/{references[-1].parent.name}")
    saved = references[-1].parent / reference["reference"]
    anchors = build_root / recipe.name / "strip" / "anchors.npy"
    anchors = anchors if anchors.is_file() else None
    with tempfile.TemporaryDirectory(prefix="mzconvert-sigmoid-grid-") as work:
        moved, count = on_logistic_grid(onnx.load(str(artifact)), Path(work))
        rows = [(f"{args.variant} as built", verify_variant(artifact, saved, reference["outputs"], recipe, anchors)),
                (f"{args.variant}, {count} sigmoids on LiteRT's int8 LOGISTIC grid",
                 verify_variant(moved, saved, reference["outputs"], recipe, anchors))]
    print(f"{recipe.name}: ONNX Runtime, {rows[0][1]['images']} verify images")
    print("| model | " + " | ".join(f"{name} SQNR" for name in reference["outputs"]) + " | matched with float32 |")
    print("| --- |" + " --- |" * (len(reference["outputs"]) + 1))
    for label, metrics in rows:
        matched = (f"{metrics['matched_detections']:.1%} of {metrics['detections_compared']}"
                   if "matched_detections" in metrics else "-")
        print(f"| {label} | " + " | ".join(f"{metrics[name]['sqnr_db']:.1f} dB" for name in reference["outputs"])
              + f" | {matched} |")


if __name__ == "__main__":
    main()
