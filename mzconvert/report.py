"""Tables for the terminal and report.md/report.json/PNG plots in dist/<recipe>/."""

from __future__ import annotations

import json
from pathlib import Path

from .dist import write_md5sums
from .errors import MzError
from .fsio import write_bytes_atomic, write_json_atomic

def read_json(folder: Path, name: str, hint: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise MzError(f"{path}: missing; {hint}")
    return json.loads(path.read_text())


def load_manifest(dist: Path, recipe_name: str) -> dict:
    return read_json(dist / recipe_name, "manifest.json", f"build it first: mzconvert build {recipe_name}")


def accuracy_key(results: dict) -> str:
    return "AP" if "AP" in next(iter(results.values())) else "top1"


def dataset_line(evaluation: dict) -> str:
    """What the numbers were measured on, from the eval itself: never fixed text."""
    d = evaluation["dataset"]
    return (f"{evaluation['recipe']} on {evaluation['images']} images of {d['name']} ({d['path']}), "
            f"{evaluation['scope']}; labels from {evaluation['labels']}. Ratios are to {evaluation['baseline']}, "
            f"with paired bootstrap 95 % intervals over the images: on a few hundred images they span a few percent.")


def eval_table(evaluation: dict, manifest: dict) -> str:
    results = evaluation["results"]
    key = accuracy_key(results)
    baseline = results.get(evaluation["baseline"], {}).get(key)
    columns = ("AP", "AP50", "AP75") if key == "AP" else ("top1", "top5", "top1_agreement")
    width = max(len(name) for name in [*results, "model"])
    lines = [dataset_line(evaluation),
             f"{'model':{width}} {'size MB':>8} " + " ".join(f"{c[:7]:>7}" for c in columns)
             + f" {'vs ' + evaluation['baseline']:>12} {'95 % interval':>16}"]
    for name, r in results.items():
        size = _size_mb(manifest, name)
        ratio = f"{r[key] / baseline:12.1%}" if baseline else f"{'-':>12}"
        low, high = r.get("ratio_interval", [float("nan")] * 2)
        interval = f"{low:7.1%} - {high:6.1%}" if low == low else f"{'-':>16}"
        lines.append(f"{name:{width}} {size:>8} " + " ".join(f"{r[c]:7.4f}" for c in columns) + f" {ratio} {interval:>16}")
    if fidelity := evaluation.get("pipeline_fidelity"):
        lines.append(f"pipeline fidelity: source-graph (our preprocessing + decode) - source-pipeline (the source "
                     f"end to end): AP {fidelity['ap_difference']:+.4f}; {fidelity['matched_share']:.1%} of "
                     f"{fidelity['detections_compared']} detections matched ({fidelity['match']})"
                     + (f"; worst image {fidelity['worst_image']} {fidelity['worst_image_share']:.0%}"
                        if fidelity["worst_image"] else ""))
    return "\n".join(lines)


def load_evals(folder: Path) -> list[dict]:
    """Every eval of dist/<recipe>/, one per dataset it was run on."""
    return [json.loads(p.read_text()) for p in sorted((folder / "eval").glob("*.json"))]


def _size_mb(manifest: dict, name: str) -> str:
    variant = manifest["variants"].get(name)
    if variant is None:
        return "-"
    return f"{manifest['artifacts'][variant['file']]['size'] / 1e6:.2f}"


def bench_table(bench: dict) -> str:
    rows = bench["results"]
    base = rows.get("float32", {}).get("median_ms")
    lines = [f"{bench['recipe']}: CPU latency, {bench['threads']} thread(s), {bench['runs']} runs after warm-up",
             f"{'model':28} {'median ms':>10} {'p90 ms':>8} {'peak RSS MB':>12} {'speed-up vs float32':>20}"]
    for name, r in rows.items():
        speedup = f"{base / r['median_ms']:19.2f}x" if base else f"{'-':>20}"
        lines.append(f"{name:28} {r['median_ms']:10.2f} {r['p90_ms']:8.2f} {r['peak_rss_mb']:12.0f} {speedup}")
    return "\n".join(lines)


def write_report(folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = load_manifest(folder.parent, folder.name)
    evaluations = load_evals(folder)
    if not evaluations:
        raise MzError(f"{folder}/eval: no evaluation; run mzconvert eval {folder.name} --dataset DIR first")
    evaluation = max(evaluations, key=lambda e: e["images"])  # the plots show the largest
    bench = read_json(folder, "bench.json", f"run mzconvert bench {folder.name} first")
    key = accuracy_key(evaluation["results"])
    names = list(evaluation["results"])
    accuracy = [evaluation["results"][n][key] for n in names]
    written = []

    def plot(filename, draw):
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
        draw(ax)
        fig.tight_layout()
        fig.savefig(folder / filename, metadata={"Software": None})  # no version/date: reproducible bytes
        plt.close(fig)
        written.append(folder / filename)

    plot("accuracy.png", lambda ax: (ax.barh(names, accuracy, color="#4477aa"), ax.set_xlabel(key),
                                      ax.set_title(f"{folder.name}: {key} per model ({evaluation['images']} images)")))
    latency_names = list(bench["results"])
    plot("latency.png", lambda ax: (ax.barh(latency_names, [bench["results"][n]["median_ms"] for n in latency_names],
                                            color="#cc6677"), ax.set_xlabel("median latency, ms (CPU)"),
                                    ax.set_title(f"{folder.name}: latency, {bench['threads']} thread(s)")))
    sized = [n for n in names if n in manifest["variants"]]

    def scatter(ax):
        sizes = [manifest["artifacts"][manifest["variants"][n]["file"]]["size"] / 1e6 for n in sized]
        ax.scatter(sizes, [evaluation["results"][n][key] for n in sized])
        for n, s in zip(sized, sizes):
            ax.annotate(n, (s, evaluation["results"][n][key]), fontsize=8)
        ax.set_xlabel("artifact size, MB")
        ax.set_ylabel(key)
        ax.set_title(f"{folder.name}: accuracy vs size")

    plot("accuracy_vs_size.png", scatter)
    report = {"recipe": folder.name, "recipe_sha256": manifest["recipe_sha256"], "eval": evaluations, "bench": bench,
              "verify": {n: v.get("verify") for n, v in manifest["variants"].items()},
              "vela": {n: v["vela"] for n, v in manifest["variants"].items() if "vela" in v}}
    write_json_atomic(folder / "report.json", report)
    md = [f"# {folder.name}", "", "## Accuracy", ""]
    for e in evaluations:
        md += ["```", eval_table(e, manifest), "```", ""]
    md += [f"The plots show the eval on {evaluation['dataset']['name']} ({evaluation['images']} images).",
          "", "![accuracy](accuracy.png)", "", "## Fidelity against the float source graph", "",
          "| variant | output | cosine | SQNR dB | max abs error |", "| --- | --- | --- | --- | --- |"]
    for name, metrics in report["verify"].items():
        for output, m in (metrics or {}).items():
            if isinstance(m, dict):
                md.append(f"| {name} | {output} | {m['cosine']:.5f} | {m['sqnr_db']:.1f} | {m['max_abs_error']:.4g} |")
    md += ["", "## CPU latency", "", "```", bench_table(bench), "```", "", "![latency](latency.png)", "",
           "## Ethos-U (vela estimates)", "",
           "| variant | target | accelerator | inference ms | NPU ops | CPU ops | SRAM KiB | flash KiB | DRAM KiB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, targets in report["vela"].items():
        for target, v in targets.items():
            flash = v.get("on_chip_flash_used_kib", 0) + v.get("off_chip_flash_used_kib", 0)
            md.append(f"| {name} | {target} | {v['accelerator']} | {v.get('inference_time_ms')} | {v['npu_ops']} | "
                      f"{v['cpu_op_count']} | {v.get('sram_used_kib')} | {flash:g} | {v.get('dram_used_kib')} |")
    md += ["", "![accuracy vs size](accuracy_vs_size.png)", ""]
    write_bytes_atomic(folder / "report.md", "\n".join(md).encode())
    written += [folder / "report.json", folder / "report.md"]
    write_md5sums(folder, [p for p in folder.rglob("*") if p.is_file() and p.name != "MD5SUMS"])
    return written
