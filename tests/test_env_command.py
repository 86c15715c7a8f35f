"""``longvit env``: the report of versions and attention backends."""

import pytest
import torch

from longvit import cli


def test_env_reports_backends_and_auto_choice(capsys):
    assert cli.main(["env", "--device", "cpu", "--dtype", "float32", "--head-dim", "32"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "attention backends for float32, head dim 32, on cpu:" in out
    assert "  cpu_flash  training, no dropout" in out
    assert "  cudnn      not available" in out
    assert "  fa4        not available" in out
    assert 'backend="auto" picks: cpu_flash for training, cpu_flash for inference' in out
    assert "packages: " in out and "timm " in out


def test_env_lists_env_in_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "  env " in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_env_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["env", "--device", "cuda"])
    assert err.value.code == 2
    assert "no CUDA device (use --device cpu)" in capsys.readouterr().err


def test_env_says_how_fa4_is_launched(monkeypatch):
    from longvit import env_command
    from longvit.attention.backends import fa4_launch

    monkeypatch.delenv("LONGVIT_FA4_REPLAY", raising=False)
    monkeypatch.setattr(fa4_launch, "fa4_version", lambda: None)
    assert "not installed" in env_command.fa4_launches()
    monkeypatch.setattr(fa4_launch, "fa4_version", lambda: fa4_launch.TESTED_VERSIONS[0])
    assert env_command.fa4_launches().startswith("replayed per call signature")
    monkeypatch.setattr(fa4_launch, "fa4_version", lambda: "4.9.0")
    assert "LONGVIT_FA4_REPLAY=1 replays anyway" in env_command.fa4_launches()
    monkeypatch.setenv("LONGVIT_FA4_REPLAY", "0")
    monkeypatch.setattr(fa4_launch, "fa4_version", lambda: fa4_launch.TESTED_VERSIONS[0])
    assert env_command.fa4_launches() == "through FA4's wrapper (LONGVIT_FA4_REPLAY)"
