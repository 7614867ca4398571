"""Tables for the terminal and report.md/report.json/PNG plots in dist/<recipe>/."""

from __future__ import annotations

import json
from pathlib import Path


def accuracy_key(results: dict) -> str:
    return "AP" if "AP" in next(iter(results.values())) else "top1"


def dataset_line(evaluation: dict) -> str:
    """What the numbers were measured on, from the eval itself: never fixed text."""
    d = evaluation["dataset"]
    return (f"{evaluation['recipe']} on {evaluation['images']} images of {d['name']} ({d['path']}), "
            f"{evaluation['scope']}; labels from {evaluation['labels']}. Ratios are to {evaluation['baseline']}, "
            f"with paired bootstrap 95 % intervals over the images: on a few hundred images they span a few percent.")


def in_order(measured: dict, key: str = "results", order: str = "models") -> dict:
    """`measured[key]` in the order the writer listed (JSON files are written with sorted keys)."""
    return {name: measured[key][name] for name in measured.get(order, measured[key])}


# the parts of a detection scored beside its box, as COCO scores them: result key prefix -> the table's title
PARTS_SCORED = {"mask_": "masks (COCO segm AP, each detection's mask against the annotated outlines):",
                "keypoint_": "keypoints (COCO keypoint AP, by OKS with the annotated points):"}


def eval_table(evaluation: dict, manifest: dict) -> str:
    results = in_order(evaluation)
    key = accuracy_key(results)
    columns = ("AP", "AP50", "AP75") if key == "AP" else ("top1", "top5", "top1_agreement")
    lines = [dataset_line(evaluation), *_score_rows(results, evaluation["baseline"], manifest, columns)]
    for prefix, title in PARTS_SCORED.items():  # a segmentation head's masks, a pose head's keypoints
        if f"{prefix}AP" in next(iter(results.values())):
            lines += [title, *_score_rows(results, evaluation["baseline"], manifest,
                                          tuple(f"{prefix}{c}" for c in ("AP", "AP50", "AP75")), prefix)]
    for name, r in results.items():
        if difference := r.get("difference"):
            low, high = difference["interval"]
            lines.append(f"{name} - {difference['to']}: {key} {difference['value']:+.4f} "
                         f"(95 % interval {low:+.4f} to {high:+.4f}, the same images)")
    if fidelity := evaluation.get("pipeline_fidelity"):
        lines.append(f"pipeline fidelity: source-graph (our preprocessing + decode) - source-pipeline (the source "
                     f"end to end): AP {fidelity['ap_difference']:+.4f}; {fidelity['matched_share']:.1%} of "
                     f"{fidelity['detections_compared']} detections matched ({fidelity['match']})"
                     + (f"; worst image {fidelity['worst_image']} {fidelity['worst_image_share']:.0%}"
                        if fidelity["worst_image"] else ""))
    return "\n".join(lines)


def _score_rows(results: dict, baseline_name: str, manifest: dict, columns: tuple[str, ...],
                prefix: str = "") -> list[str]:
    """A header and a row per model: its size, `columns`, and the ratio of the first to the baseline's with its
    interval (`prefix` + ratio_interval)."""
    key = columns[0]
    baseline = results.get(baseline_name, {}).get(key)
    width = max(len(name) for name in [*results, "model"])
    lines = [f"{'model':{width}} {'kernels':>9} {'size MB':>8} "
             + " ".join(f"{c[len(prefix):][:7]:>7}" for c in columns)
             + f" {'vs ' + baseline_name:>12} {'95 % interval':>16}"]
    for name, r in results.items():
        size = size_mb(manifest, name)
        ratio = f"{r[key] / baseline:12.1%}" if baseline else f"{'-':>12}"
        low, high = r.get(prefix + "ratio_interval", [float("nan")] * 2)
        interval = f"{low:7.1%} - {high:6.1%}" if low == low else f"{'-':>16}"
        values = " ".join(f"{r[c]:7.4f}" for c in columns)
        lines.append(f"{name:{width}} {r.get('kernels', '-'):>9} {size:>8} {values} {ratio} {interval:>16}")
    return lines


def load_evals(folder: Path) -> list[dict]:
    """Every eval of dist/<recipe>/, one per dataset it was run on."""
    return [json.loads(p.read_text()) for p in sorted((folder / "eval").glob("*.json"))]


def size_mb(manifest: dict, name: str) -> str:
    variant = manifest["variants"].get(name)
    if variant is None:
        return "-"
    return f"{manifest['artifacts'][variant['file']]['size'] / 1e6:.2f}"


def bench_table(bench: dict) -> str:
    rows = in_order(bench)
    base = rows.get("float32", {}).get("median_ms")
    lines = [f"{bench['recipe']}: CPU latency, {bench['threads']} thread(s), {bench['runs']} runs after warm-up",
             f"{'model':28} {'median ms':>10} {'p90 ms':>8} {'peak RSS MB':>12} {'speed-up vs float32':>20} "
             f"{'integer convs':>14}"]
    for name, r in rows.items():
        speedup = f"{base / r['median_ms']:19.2f}x" if base else f"{'-':>20}"
        integer = r.get("integer_convs")  # ONNX: convolutions ORT fused into integer kernels, of all
        fused = f"{integer[0]} of {integer[1]}" if integer and integer[1] else "-"
        lines.append(f"{name:28} {r['median_ms']:10.2f} {r['p90_ms']:8.2f} {r['peak_rss_mb']:12.0f} {speedup} "
                     f"{fused:>14}")
    return "\n".join(lines)


