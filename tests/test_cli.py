"""The `loopkit` command: each subcommand as a subprocess; errors, help, exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from forensics_parts import (
    COUNTING_LOSS,
    base_config,
    build_data,
    build_model,
    loss_fn,
    nudged_pair,
)

import loopkit as lk
from loopkit.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "examples" / "configs"
HANG_S = 600  # only catches a hang


def loopkit(*args: str | Path, cwd: Path, script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the command (`python -m loopkit`, or the installed console script) in `cwd`."""
    command = (
        [str(Path(sys.executable).parent / "loopkit")]
        if script
        else [sys.executable, "-m", "loopkit"]
    )
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=HANG_S
    )


def test_fit_from_a_config_ends_bitwise_equal_to_the_same_fit_from_python(tmp_path):
    done = loopkit(
        "fit", CONFIGS / "spirals.toml", "--set", "max_steps=30", "--set", "threads=1",
        "--set", "log_dir=runs/cli", "--save-model", "model", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "FitResult: 30 steps" in done.stdout
    assert (tmp_path / "runs" / "cli" / "loopkit-run.json").exists()
    assert lk.read_fingerprints(tmp_path / "runs" / "cli")

    # The same run written out in Python (spirals.toml's values by hand).
    sys.path[:0] = [str(CONFIGS), str(CONFIGS.parent)]
    try:
        import spirals
        from custom_loop import loss_fn as spirals_loss
    finally:
        del sys.path[:2]
    torch.manual_seed(0)
    result = lk.fit(
        spirals.build_model(hidden=64),
        spirals.build_data(n=9600),
        loss_fn=spirals_loss,
        optimizer={"name": "AdamW", "lr": 0.03},
        schedule=lk.schedules.cosine(warmup_steps=20, total_steps=300),
        max_steps=30,
        batch_size=32,
        clip=1.0,
        eval_data=spirals.build_data(n=2000, seed=1),
        eval_every=100,
        metrics=["accuracy"],
        log_every=50,
        progress=False,
        seed=0,
    )
    from_cli = safetensors.torch.load_file(str(tmp_path / "model" / "model.safetensors"))
    from_python = result.state.model.state_dict()
    assert from_cli.keys() == from_python.keys()
    assert all(torch.equal(from_cli[k], from_python[k]) for k in from_cli)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    torch.manual_seed(0)
    lk.fit(
        build_model(8), build_data(128), loss_fn=loss_fn, optimizer={"name": "SGD", "lr": 0.1},
        max_steps=6, batch_size=16, progress=False, checkpoint_dir=directory, save_every=2,
    )  # fmt: skip
    return directory


def test_ckpt_ls_lists_the_checkpoints_newest_first(checkpoints, tmp_path):
    done = loopkit("ckpt", "ls", checkpoints, "--json", cwd=tmp_path, script=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["step"] for r in rows] == [6, 4, 2]
    assert all(r["complete"] and len(r["run_id"]) == 12 for r in rows)


def test_ckpt_inspect_prints_counters_run_id_and_shapes(checkpoints, capsys):
    assert main(["ckpt", "inspect", str(checkpoints / "step-00000004")]) == 0
    text = capsys.readouterr().out
    assert "step: 4" in text and "run_id: " in text
    assert "2.weight  F32  (8, 8)" in text
    assert main(["ckpt", "inspect", str(checkpoints), "--json"]) == 0  # the newest
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 6 and info["model"]["4.bias"]["shape"] == [1]


def test_ckpt_validate_exits_1_and_names_the_bad_checkpoint(checkpoints, tmp_path, capsys):
    assert main(["ckpt", "validate", str(checkpoints)]) == 0
    bad = tmp_path / "checkpoints"
    bad.mkdir()
    for name in ("step-00000002", "step-00000004"):
        target = bad / name
        target.mkdir()
        for f in (checkpoints / name).iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "step-00000004" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "step-00000004" / "model.safetensors").write_bytes(bytes(data))
    assert main(["ckpt", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "step-00000002: ok" in out
    assert "step-00000004: BAD" in out and "sha256" in out


def test_diff_with_replay_reports_the_step_the_tensor_and_the_module(tmp_path):
    run_a, run_b = nudged_pair(tmp_path)
    done = loopkit("diff", run_a, run_b, "--json", "--replay", "--plot", "d.png", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # 1: the runs differ
    report = json.loads(done.stdout)
    assert report["first_divergent_step"] == 37
    assert report["tensors"][0] == "weights/2.weight"
    assert report["replay"]["module"] == "2" and report["replay"]["type"] == "Linear"
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_certify_resume_passes_on_the_tiny_demo_config(tmp_path):
    done = loopkit(
        "certify-resume", CONFIGS / "gpt_tiny.toml", "--set", "max_steps=16", "--set",
        "threads=1", "--interruptions", "2", "--workdir", "w", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    certificate = json.loads(done.stdout)
    assert certificate["bitwise"] is True and certificate["final_weights_equal"] is True
    assert certificate["steps"] == 16 and certificate["window"] == 2
    assert len(certificate["interruptions"]) == 2
    assert any(i["mid_window"] for i in certificate["interruptions"])
    assert certificate["epochs"] >= 2  # it ran across an epoch end


def test_certify_resume_exits_1_with_the_first_divergent_step(tmp_path, capsys):
    argv = [
        "certify-resume", str(base_config(tmp_path)), "--set",
        COUNTING_LOSS, "--set", "max_steps=10",
        "--interruptions", "1", "--workdir", str(tmp_path / "w"),
    ]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "bitwise: no" in out and "first divergent step:" in out


def test_a_bad_argument_exits_2_naming_it(tmp_path, capsys):
    cases: list[tuple[list[str], str]] = [
        (["diff", "only-one-run"], "RUN_B"),
        (["diff", "a", "b", "--rtol", "-1"], "argument --rtol"),
        (["certify-resume", "c.toml", "--interruptions", "0"], "argument --interruptions"),
        (["ckpt", "shred", "x"], "argument ACTION"),
        (["nonsense"], "argument COMMAND"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_bad_config_value_exits_2_naming_it(tmp_path, capsys):
    config = str(base_config(tmp_path))
    cases: list[tuple[list[str], str]] = [
        (["fit", config, "--set", "max_steps=0"], "FitConfig(max_steps=0)"),
        (["fit", config, "--set", "max_stepz=3"], "unknown key(s) ['max_stepz']"),
        (["fit", config, "--set", "oops"], "--set 'oops': expected key=value"),
        (["fit", config, "--set", "model.call=nowhere:build"], "model.call='nowhere:build'"),
        (["fit", str(tmp_path / "missing.toml")], "cannot read it"),
        (["diff", str(tmp_path), str(tmp_path)], "no fingerprints here"),
        (["ckpt", "ls", str(tmp_path / "nope")], "no such directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith(f"loopkit {argv[0]}"), err


@pytest.mark.parametrize(
    "argv", [[], ["fit"], ["ckpt"], ["ckpt", "ls"], ["diff"], ["certify-resume"]], ids=str
)
def test_every_subcommand_has_help(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: loopkit") and "--help" in text


def _documented_commands() -> list[str]:
    """Every `loopkit ...` line in the bash blocks of docs/cli.md and docs/forensics.md."""
    commands = []
    for page in ("cli.md", "forensics.md"):
        text = (ROOT / "docs" / page).read_text()
        for block in text.split("```bash")[1:]:
            body = block.split("```")[0].replace("\\\n", " ")
            for line in body.splitlines():
                line = line.split("  #")[0].strip()
                synopsis = "CONFIG" in line or "RUN_A" in line or " [-" in line
                if line.startswith("loopkit ") and not synopsis:
                    commands.append(line)
    return commands


@pytest.mark.parametrize("command", _documented_commands())
def test_the_documented_commands_parse_and_their_files_exist(command: str) -> None:
    import shlex

    from loopkit.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    config = getattr(args, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), config
