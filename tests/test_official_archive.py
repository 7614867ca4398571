"""The official TF-zoo SSDLite recipe: real URL and checksums, its code path exercised over loopback HTTP."""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile

import pytest
import yaml

from mzconvert.recipe import load_recipe
from tests.conftest import MIRROR, PEDESTRIAN_PB, run_cli

pytestmark = pytest.mark.slow
ARCHIVE = "ssdlite_mobilenet_v2_coco_2018_05_09.tar.gz"


def test_recipe_is_pinned_with_the_published_hashes():
    official = list(csv.DictReader((MIRROR / "OFFICIAL-HASHES.tsv").open(), delimiter="\t"))
    rows = {row["algorithm"]: row for row in official if row["file"] == ARCHIVE}
    source = load_recipe("ssdlite-mobilenetv2").source
    assert source.url == rows["sha384"]["url"]
    assert source.size == int(rows["sha384"]["bytes"]) == 51025348
    assert source.checksums == {"sha384": rows["sha384"]["digest"], "sha256": rows["sha256"]["digest"]}


def test_same_layout_archive_served_locally_builds(tmp_path, http_server, mirror):
    archive = tmp_path / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:  # the zoo layout: one top folder, checkpoint files beside
        tar.add(PEDESTRIAN_PB, arcname="ssdlite_mobilenet_v2_coco_2018_05_09/frozen_inference_graph.pb")
        tar.add(mirror / "README.md", arcname="ssdlite_mobilenet_v2_coco_2018_05_09/pipeline.config")
    data = archive.read_bytes()
    http_server.files[f"/models/object_detection/{ARCHIVE}"] = data

    recipe = yaml.safe_load(load_recipe("ssdlite-mobilenetv2").path.read_text())
    recipe["source"] = {"url": f"{http_server.url}/models/object_detection/{ARCHIVE}",
                        "member": recipe["source"]["member"], "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()}
    local = tmp_path / "ssdlite-mobilenetv2.yaml"
    local.write_text(yaml.safe_dump(recipe))

    args = ["--cache-dir", str(tmp_path / "cache"), "--mirror", str(mirror), "build", str(local),
            "--variant", "float32", "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p for p, _ in http_server.requests] == [f"/models/object_detection/{ARCHIVE}"]
    manifest = json.loads((tmp_path / "dist/ssdlite-mobilenetv2/manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["variants"]["float32"]["verify"]["concat"]["max_abs_error"] < 1e-3
    assert (tmp_path / "dist/ssdlite-mobilenetv2/labels.txt").read_text().splitlines()[0] == "person"

    # A tampered origin: the cache is cleared, the server now sends other bytes of the same size.
    http_server.files[f"/models/object_detection/{ARCHIVE}"] = data[:-1] + bytes([data[-1] ^ 1])
    bad = run_cli("--quiet", "--cache-dir", str(tmp_path / "cache2"), "fetch", str(local))
    assert bad.returncode == 3
    assert "no source served a file matching sha256" in bad.stderr
    assert f"rejected: origin {http_server.url}/models/object_detection/{ARCHIVE} served sha256" in bad.stderr
    assert not list((tmp_path / "cache2").glob("sha256/*"))
