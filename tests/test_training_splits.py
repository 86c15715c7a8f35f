"""Patient-level folds (``longvit split``), fitting one fold, and ``longvit folds-summary``."""

import csv
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from longvit.cli import main as longvit_main
from longvit.demo.feature_cohort import make_feature_cohort
from longvit.training import FeatureDataModule, ManifestError
from longvit.training.folds_summary import mean_sd
from longvit.training.splits import assign_folds, write_clam_splits


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A feature cohort whose patients have 1 to 3 slides each (labels per patient)."""
    root = tmp_path_factory.mktemp("cohort")
    manifest = make_feature_cohort(root, n_slides=36, tiles=(10, 20), dim=4, signal=6.0)
    rows = list(csv.DictReader(manifest.open()))
    sizes = [1, 2, 3]
    i, patient = 0, 0
    by_label = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    for label_rows in by_label.values():  # a patient's slides share its label
        i = 0
        while i < len(label_rows):
            for row in label_rows[i : i + sizes[patient % 3]]:
                row["patient"] = f"P{patient:03d}"
            i += sizes[patient % 3]
            patient += 1
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _split(cohort, tmp_path, *extra):
    out = tmp_path / "folds.csv"
    argv = ["split", str(cohort), "--by", "patient", "--folds", "5", "--stratify", "label",
            "--out", str(out), *extra]  # fmt: skip
    assert longvit_main(argv) == 0
    return out, list(csv.DictReader(out.open()))


def test_split_keeps_patients_whole_and_balances_labels(cohort, tmp_path):
    out, rows = _split(cohort, tmp_path)
    folds_of_patient = defaultdict(set)
    for r in rows:
        folds_of_patient[r["patient"]].add(r["fold"])
        for k in range(5):  # fold k tests fold k, validates on fold k+1, trains on the rest
            fold = int(r["fold"])
            expected = "test" if fold == k else "val" if fold == (k + 1) % 5 else "train"
            assert r[f"split_fold{k}"] == expected
        assert r["split"] == r["split_fold0"]
    assert all(len(f) == 1 for f in folds_of_patient.values())  # no patient in two folds
    per_fold = Counter((r["fold"], r["label"]) for r in rows)
    for label in ("0", "1"):  # 18 slides of each label over 5 folds, patients of <= 3 slides
        counts = [per_fold[(str(k), label)] for k in range(5)]
        assert sum(counts) == 18 and max(counts) - min(counts) <= 3
    # the manifest's relative paths still resolve from the new file's folder
    data = FeatureDataModule(out, fold=2)
    manifest = data.load_manifest()
    assert {r.slide_id for r in manifest.split("test")} == {
        r["slide_id"] for r in rows if r["fold"] == "2"
    }
    assert {r.slide_id for r in manifest.split("val")} == {
        r["slide_id"] for r in rows if r["fold"] == "3"
    }


def test_split_is_seeded_and_deterministic(cohort, tmp_path):
    _, a = _split(cohort, tmp_path / "a")
    _, b = _split(cohort, tmp_path / "b")
    _, c = _split(cohort, tmp_path / "c", "--seed", "1")
    assert [r["fold"] for r in a] == [r["fold"] for r in b]
    assert [r["fold"] for r in a] != [r["fold"] for r in c]


def test_assign_folds_never_splits_a_group():
    groups = [f"p{i // 4}" for i in range(40)]  # 10 patients of 4 slides
    strata = ["x" if i < 20 else "y" for i in range(40)]
    folds = assign_folds(groups, strata, n_folds=5, seed=3)
    for g in set(groups):
        assert len({f for f, gg in zip(folds, groups) if gg == g}) == 1
    assert Counter(folds) == {k: 8 for k in range(5)}


def test_errors_name_the_column_and_the_fix(cohort, tmp_path, capsys):
    assert longvit_main(["split", str(cohort), "--by", "case_id"]) == 2
    assert "no column 'case_id' for --by" in capsys.readouterr().err
    with pytest.raises(ManifestError, match="split_fold1.*longvit split"):
        FeatureDataModule(cohort, fold=1).load_manifest()


def test_clam_splits(cohort, tmp_path):
    out, rows = _split(cohort, tmp_path)
    (first, *_) = write_clam_splits(out, tmp_path / "clam")
    table = list(csv.DictReader(first.open()))
    test_ids = {r["test"] for r in table if r["test"]}
    assert test_ids == {r["slide_id"] for r in rows if r["fold"] == "0"}
    assert len(list((tmp_path / "clam").glob("splits_*.csv"))) == 5


def test_fit_two_folds_then_summary(cohort, tmp_path, monkeypatch, capsys):
    out, _ = _split(cohort, tmp_path)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parent.parent / "configs" / "meanpool_features.yaml"
    aurocs = []
    for fold in (0, 1):
        run = tmp_path / f"fold{fold}"
        common = [
            "--config", str(config), "--data.init_args.manifest", str(out),
            "--data.init_args.fold", str(fold), "--data.init_args.num_workers", "0",
            "--model.init_args.model_kwargs", "{in_chans: 4}", "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(run),
            "--trainer.callbacks.init_args.output_dir", str(run / "predictions"),
        ]  # fmt: skip
        assert longvit_main(["fit", *common]) == 0
        (best,) = run.rglob("best.ckpt")
        assert longvit_main(["test", *common, "--ckpt_path", str(best)]) == 0
        logged = [r for m in run.rglob("metrics.csv") for r in csv.DictReader(m.open())
                  if r.get("test/auroc")]  # fmt: skip
        aurocs.append(float(logged[-1]["test/auroc"]))
    capsys.readouterr()
    assert longvit_main(["folds-summary", str(tmp_path / "fold*")]) == 0
    printed = capsys.readouterr().out
    mean, sd = mean_sd(aurocs)
    line = next(line for line in printed.splitlines() if line.startswith("test/auroc"))
    assert f"{mean:.4f} ± {sd:.4f}  (n=2)" in line
