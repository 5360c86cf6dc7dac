"""The HTML report treats every field of a run directory as untrusted text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flsec.aggregation import AGGREGATORS
from flsec.errors import FlsecError
from flsec.fl.engines import train
from flsec.report.html import _defense, write_report
from tests.conftest import small_config

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


@pytest.fixture
def run_dir(trained_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained_run, out / "train")
    return out


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_metrics_fields_are_escaped(run_dir: Path) -> None:
    _write(run_dir / "invert" / "metrics.json",
           {"method": HOSTILE, "summary": {"images": HOSTILE, "mean_psnr": 30.0, "label_accuracy": 1.0},
            "targets": [{"round": 1, "client": 0, "kind": HOSTILE, "malicious_client": True}]})
    _write(run_dir / "unlearn" / "metrics.json",
           {"verification": {"reconstructions": 3, "reason": HOSTILE}, "defender_holds": HOSTILE,
            "before": {"ma": 0.9, "asr": 1.0}, "after": {"ma": 0.9, "asr": 0.0},
            "baseline_finetune": {"ma": 0.9, "asr": 0.9, "clean_images": HOSTILE}, "settings": {"steps": HOSTILE}})
    page = write_report(run_dir).read_text()
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page
    assert page.count("&lt;script&gt;") >= 5  # method, images, reason, defender_holds, clean_images, steps
    assert "Phase 2" in page and "Phase 3" in page


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_corrupt_metrics_give_one_line(run_dir: Path, content: str) -> None:
    path = run_dir / "invert" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(FlsecError, match="invert/metrics.json") as info:
        write_report(run_dir)
    assert "\n" not in str(info.value)
    assert not (run_dir / "report.html").exists()


def test_missing_field_is_named(run_dir: Path) -> None:
    _write(run_dir / "unlearn" / "metrics.json", {"verification": {}, "before": {"ma": 1.0, "asr": 0.0}})
    with pytest.raises(FlsecError, match="missing field 'after'"):
        write_report(run_dir)


def test_report_states_durability_and_dba_parts(run_dir: Path) -> None:
    """The training section says how long the backdoor outlived the attack, and each DBA part's ASR."""
    from flsec.report.html import _training_notes

    history = [{"round": 1, "asr": 0.9, "attackers": [0]}, {"round": 2, "asr": 0.95, "attackers": [0]},
               {"round": 3, "asr": 0.7, "attackers": []}, {"round": 4, "asr": 0.4, "attackers": [],
                                                            "asr_parts": [0.25, 0.125]}]
    notes = _training_notes(history)
    assert notes[0] == ("Durability: the attackers stopped after round 2 with ASR 95.00%; 2 round(s) later it is "
                        "40.00%. It stayed at or above 50.00% for 1 round(s).")
    assert notes[1] == ("Distributed trigger: ASR with the global trigger 40.00%; with each attacker's local part "
                        "alone 25.00%, 12.50%.")
    assert "until the run ended" in _training_notes(history[:3])[0]
    assert _training_notes([{"round": 1, "asr": 0.1, "attackers": []}]) == []
    write_report(run_dir)  # the fixture's attackers attack in every round: nothing to say on durability
    assert "Durability:" not in (run_dir / "report.html").read_text()


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&#34;").replace("'", "&#39;")


@pytest.mark.parametrize("rule", ["fedavg", "multi_krum"])
def test_report_names_the_paper_of_the_run_defense(trained_run: Path, tmp_path: Path, rule: str) -> None:
    out = tmp_path / "run"
    if rule == "fedavg":
        shutil.copytree(trained_run, out / "train")
    else:
        train(small_config(training={"rounds": 1}, aggregation={"name": rule, "f": 1}), out / "train", progress=False)
    page = write_report(out).read_text()
    cls = AGGREGATORS.get(rule)
    assert f"<p class=\"note\">{rule}: " in page
    assert _escaped(cls.citation) in page
    year = {"fedavg": "McMahan et al. 2017", "multi_krum": "Blanchard et al. 2017"}[rule]
    assert year in page
    other = AGGREGATORS.get("fl_defender").citation
    assert _escaped(other) not in page  # only the run's rule is described


def test_report_of_an_unknown_rule_names_it_without_a_paper() -> None:
    assert _defense("my_plugin_rule") == "my_plugin_rule: not a registered aggregation rule in this installation " \
                                         "(no description)."


def test_report_says_how_guided_neural_cleanse_found_the_target(run_dir: Path) -> None:
    """A target found by Neural Cleanse guided by the reconstructions' labels is reported as such,
    with the candidates, the ratio and the flip rates (not as a verification on suspects)."""
    _write(run_dir / "unlearn" / "metrics.json",
           {"verification": {"reconstructions": 32, "backdoor_found": True, "trigger_source": "guided_neural_cleanse",
                             "suspected_target": 0, "true_target": 0, "suspects": None,
                             "reverse_engineering": {"candidates": [0, 8], "ratio": 0.6},
                             "clean_reconstructions_flipped_by_estimated_trigger": 0.5,
                             "carriers_flipped_by_estimated_trigger": 0.75, "mask_iou_with_true_trigger": 0.44},
            "carriers": "synthetic", "before": {"ma": 0.975, "asr": 0.99}, "after": {"ma": 0.969, "asr": 0.03}})
    page = write_report(run_dir).read_text()
    assert "0 of 32 carry a universal one" in page and "their labels point at [0, 8]" in page
    assert "at most 0.6 times" in page and "flips 50.00%" in page and "on the carriers 75.00%" in page
    assert "None of" not in page
