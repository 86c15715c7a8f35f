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
