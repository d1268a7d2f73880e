"""Forensics: the first divergent step, the tensors at fault, the module at fault, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from forensics_parts import COUNTING_LOSS, base_config, nudged_pair, train

from loopkit.certify import certify_resume
from loopkit.forensics import diff_runs, plot_diff
from loopkit.replay import capture_step, first_difference, replay
from loopkit.run_config import RunConfig


def run_config(directory: Path, *sets: str) -> RunConfig:
    """The tests' base config (forensics_parts) with `sets` merged, as `loopkit fit` reads it."""
    return RunConfig.load(base_config(directory), list(sets))


@pytest.fixture(scope="module")
def nudged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Run A: one weight of module "2" nudged after step 37; run B: untouched."""
    return nudged_pair(tmp_path_factory.mktemp("nudged"))


def test_diff_names_the_nudged_step_and_tensor(nudged):
    report = diff_runs(*nudged)
    assert report.first_divergent_step == 37
    assert report.tensors[0] == "weights/2.weight"
    entering = {d.name for d in report.differences if d.entering}
    assert entering == {"weights/2.weight"}  # the rest differs as its consequence
    assert "loss" in report.tensors
    assert report.steps_compared == list(range(40))
    assert "first divergent step: 37" in report.format()
    as_json = report.to_json()
    assert as_json["first_divergent_step"] == 37 and as_json["tensors"][0] == "weights/2.weight"
    json.dumps(as_json)  # no NaN or inf


def test_identical_runs_show_no_difference_bitwise(nudged, tmp_path):
    again = tmp_path / "b-again"
    train(run_config(tmp_path, f"log_dir={again}"))
    report = diff_runs(nudged[1], again)
    assert report.bitwise and report.first_divergent_step is None
    assert report.tensors == [] and max(report.max_rel_diff) == 0.0
    assert "no difference (bitwise equal)" in report.format()


def test_summation_order_differs_bitwise_from_the_first_step_and_passes_a_tolerance(tmp_path):
    """accumulate 1 x 16 samples vs 4 x 4 samples: the same mean gradient, float32 rounding."""
    one = tmp_path / "k1"
    four = tmp_path / "k4"
    train(run_config(tmp_path, f"log_dir={one}", "batch_size=16"))
    train(run_config(tmp_path, f"log_dir={four}", "batch_size=4", "accumulate=4"))
    bitwise = diff_runs(one, four)
    assert bitwise.first_divergent_step == 0
    assert all(not d.entering for d in bitwise.differences)  # the same weights went in
    assert any(d.name.startswith("grads/") for d in bitwise.differences)
    assert "micro-step seeds not compared" in bitwise.notes[0]
    assert diff_runs(one, four, rtol=1e-4, atol=1e-6).first_divergent_step is None


def test_replay_names_the_module_that_holds_the_nudged_weight(nudged):
    found = replay(*nudged, 37)
    assert found["module"] == "2" and found["type"] == "Linear"
    assert found["what"] == "output" and found["shape"] == [16, 16]
    assert found["max_abs_diff"] > 0
    assert found["checkpoint_a"].endswith("step-00000037")


def test_replayed_from_before_the_nudge_no_module_differs(nudged):
    """Callbacks do not run in a replay: from step 36 the nudge after step 37 is not redone,
    which tells a change made between steps from one made inside a step."""
    captures = [
        capture_step(RunConfig.from_record(run), Path(f"{run}-ckpt/step-00000036"), 37)
        for run in nudged
    ]
    assert captures[0] and first_difference(*captures) is None
    with pytest.raises(ValueError, match="no valid checkpoint at or before step 0"):
        replay(*nudged, 0)


def test_plot_draws_both_loss_curves(nudged, tmp_path):
    path = plot_diff(diff_runs(*nudged), tmp_path / "diff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_refuses_what_it_cannot_compare(tmp_path, nudged):
    with pytest.raises(ValueError, match="no fingerprints here"):
        diff_runs(tmp_path, nudged[0])
    with pytest.raises(ValueError, match="rtol=-1"):
        diff_runs(*nudged, rtol=-1)


def test_certify_resume_fails_on_a_loss_with_state_outside_the_record(tmp_path):
    config = run_config(tmp_path, COUNTING_LOSS, "max_steps=12")
    certificate = certify_resume(config, interruptions=2, seed=1, workdir=str(tmp_path / "w"))
    assert not certificate.ok
    first_resume = certificate.interruptions[0].stopped_at
    assert certificate.report.first_divergent_step == first_resume
    assert "bitwise: no" in certificate.format()
    assert f"first divergent step: {first_resume}" in certificate.format()


def test_certify_resume_passes_when_everything_lives_in_the_record(tmp_path):
    config = run_config(tmp_path, "max_steps=12", "batch_size=8", "accumulate=2")
    certificate = certify_resume(config, interruptions=2, seed=0, workdir=str(tmp_path / "w"))
    assert certificate.ok, certificate.format()
    assert certificate.window == 2 and len(certificate.interruptions) == 2
    assert any(i.mid_window for i in certificate.interruptions)
    assert "bitwise: yes" in certificate.format()
