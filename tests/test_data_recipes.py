"""data/: the templates parse as manifests, and `longvit manifest` builds one from a folder."""

import csv
from pathlib import Path

import pytest

from longvit.cli import main as longvit_main
from longvit.training import read_manifest

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.mark.parametrize(
    "name, task, column",
    [("manifest_features.csv", "classification", "split"),
     ("manifest_survival.csv", "survival", "split"),
     ("manifest_folds.csv", "classification", "split_fold3")],
)  # fmt: skip
def test_templates_are_manifests(name, task, column):
    manifest = read_manifest(DATA / "templates" / name, task=task, check_files=False,
                             split_column=column)  # fmt: skip
    assert len(manifest.rows) == 2


def test_manifest_from_a_tcga_folder_then_split(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    cases = [f"TCGA-AB-{i:04d}" for i in range(10)]
    for i, case in enumerate(cases):
        for dx in range(1 + i % 2):  # some cases have two diagnostic slides
            (slides / f"{case}-01Z-00-DX{dx + 1}.svs").write_bytes(b"")
    (slides / "TCGA-ZZ-9999-01Z-00-DX1.svs").write_bytes(b"")  # no label: left out
    (slides / "notes.txt").write_text("not a slide")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient,label\n" + "".join(
        f"{c},{'LUAD' if i % 2 else 'LUSC'}\n" for i, c in enumerate(cases)))  # fmt: skip
    out = tmp_path / "out" / "manifest.csv"
    argv = ["manifest", str(slides), "--labels", str(labels), "--key", "patient",
            "--patient-from", "tcga", "--out", str(out)]  # fmt: skip
    assert longvit_main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 15 and all(r["split"] == "train" for r in rows)
    assert {r["patient"] for r in rows} == set(cases)
    for r in rows:  # each slide got its case's label
        assert r["label"] == ("LUAD" if cases.index(r["patient"]) % 2 else "LUSC")
    manifest = read_manifest(out, mode="pixels")  # relative slide paths resolve
    assert manifest.class_names == ["LUAD", "LUSC"]
    assert longvit_main(["split", str(out), "--folds", "5"]) == 0
    folds = list(csv.DictReader((out.parent / "manifest_folds.csv").open()))
    by_patient = {}
    for r in folds:
        assert by_patient.setdefault(r["patient"], r["fold"]) == r["fold"]
