"""The `hetero` command runs end to end."""

import pytest

from hetero import cli


def test_demo_runs_and_finds_the_needle(capsys):
    assert cli.main(["demo", "--seq", "4096", "--budget", "256", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "needle found" in out and "MISSED" not in out and "faster" in out


def test_devices_lists_torch_cpu(capsys):
    assert cli.main(["devices"]) == 0
    assert "torch:cpu" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--seq", "0"], ["demo", "--repeats", "-1"], ["nonsense"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
