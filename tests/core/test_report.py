import json

import pytest
import torch

from kswap import AccuracyMeter, SwapReport, atomic_save, load_checkpoint, swap_hmean, top1_accuracy


def _report():
    report = SwapReport(order="learn_then_forget", classes={"forget": ["0"], "retain": ["1", "2"], "learn": ["x"]})
    report.set_before({"forget": 98.0, "retain": 95.0, "learn": 0.0})
    report.record(5, "0_learn", {"forget": 97.0, "retain": 94.0, "learn": 60.0})
    report.end_phase("0_learn", "learn", 10, {"forget": 96.0, "retain": 94.5, "learn": 91.0})
    report.end_phase("1_forget", "forget", 20, {"forget": 1.0, "retain": 94.0, "learn": 92.0})
    return report


def test_report_schema_and_round_trip():
    data = _report().to_dict()
    assert data["order"] == "learn_then_forget"
    assert data["metrics"]["before"] == {"forget": 98.0, "retain": 95.0, "learn": 0.0}
    assert data["metrics"]["after"] == {"forget": 1.0, "retain": 94.0, "learn": 92.0}
    phases = data["metrics"]["phases"]
    assert [p["name"] for p in phases] == ["0_learn", "1_forget"]
    assert phases[1]["before"] == phases[0]["after"]
    assert [p["step"] for p in data["curve"]] == [0, 5, 10, 20]
    assert data["hmean"] == pytest.approx(3 / (1 / 97 + 1 / 94 + 1 / 92))
    assert SwapReport.from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_report_write(tmp_path):
    paths = _report().write(tmp_path)
    assert json.loads(paths["json"].read_text())["metrics"]["after"]["forget"] == 1.0
    md = paths["md"].read_text()
    assert "| forget | lower | 98.00 | 96.00 | 1.00 |" in md and "after 1_forget" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_report_rejects_incomplete_scores():
    with pytest.raises(ValueError, match="missing"):
        SwapReport(order="joint").set_before({"forget": 1.0})


def test_hmean_and_accuracy():
    assert swap_hmean({"forget": 90, "retain": 0, "learn": 0}, {"forget": 90, "retain": 80, "learn": 80}) == 0.0
    assert swap_hmean({"forget": 90}, {"forget": 0, "retain": 90, "learn": 90}) == pytest.approx(90.0)
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    labels = torch.tensor([1, 1, 1])
    assert top1_accuracy(logits, labels) == pytest.approx(200 / 3)
    meter = AccuracyMeter()
    meter.update(logits[:2], labels[:2])
    meter.update(logits[2:], labels[2:])
    assert meter.value == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="saw no samples"):
        _ = AccuracyMeter().value


def test_atomic_save_loads_weights_only(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"model": {"w": torch.ones(2)}, "step": 3, "report": _report().to_dict()}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_report_says_how_each_score_was_computed_and_what_scoring_cost():
    report = SwapReport(order="learn_then_forget")
    full, sub = {"forget": 300, "retain": 900, "learn": 400}, {"forget": 200, "retain": 200, "learn": 200}
    scores = {"forget": 90.0, "retain": 90.0, "learn": 0.0}
    with report.timed():
        report.set_before(scores, images=full)
    report.record(5, "0_learn", scores, images=sub, subsample=True)
    report.end_phase("0_learn", "learn", 10, scores, images=full)
    report.timing["run_s"] = 100 * report.timing["scoring_s"]
    data = json.loads(json.dumps(report.to_dict()))
    assert [(r["images"], r["subsample"]) for r in data["curve"]] == [(full, False), (sub, True), (full, False)]
    assert data["timing"]["scoring_s"] > 0 and SwapReport.from_dict(data).timing == report.timing
    text = report.to_markdown()
    assert "the whole test sets (forget 300, retain 900, learn 400 images)" in text
    assert "a seeded subsample of each set (forget 200, retain 200, learn 200 images)" in text
    assert "(1.0 %)" in text
