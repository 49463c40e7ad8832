"""pipeline.flags.command_main, the entry point of every command: one error line prefixed with the program, and the
exit status (0 done, 1 failed, 2 bad arguments, 128 + signal when stopped, 130 on Ctrl-C); and each command's
``python -m`` entry point through it."""
import runpy
import signal
import sys

import pytest

from crate_kernels.errors import ConfigError, DatasetError, StopRequested, TrainError
from crate_kernels.pipeline.flags import RESUME_HINT, command_main


def _raise(error):
    def run(cfg):
        assert cfg == {"resolved": ["--x"]}
        if error is not None:
            raise error
    return run


@pytest.mark.parametrize("error, code, line", [
    (None, 0, None),
    (ConfigError("--x must be positive, got -1"), 2, "prog: error: --x must be positive, got -1"),
    (TrainError("checkpoint c.pth is damaged"), 1, "prog: error: checkpoint c.pth is damaged"),
    (DatasetError("no images under d/"), 1, "prog: error: no images under d/"),
    (StopRequested(signal.SIGTERM, "stopped"), 128 + signal.SIGTERM, None),
    (KeyboardInterrupt(), 130, f"prog: {RESUME_HINT}"),
])
def test_each_outcome_has_its_exit_status_and_one_line(error, code, line, capsys):
    assert command_main("prog", lambda argv: {"resolved": argv}, _raise(error), ["--x"], RESUME_HINT) == code
    err = capsys.readouterr().err
    assert err == (f"{line}\n" if line else "")


def test_a_bad_flag_stops_before_the_run(capsys):
    ran = []

    def resolve(argv):
        raise ConfigError(f"--lr expects a number, got {argv[1]!r}")

    assert command_main("prog", resolve, ran.append, ["--lr", "fast"]) == 2
    assert capsys.readouterr().err == "prog: error: --lr expects a number, got 'fast'\n" and not ran


def test_a_failure_is_printed_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert command_main("prog", lambda argv: {"resolved": argv}, _raise(TrainError("lost")), ["--x"]) == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("module, program", [
    ("crate_kernels.probe", "crate-probe"), ("crate_kernels.analyze", "crate-analyze"),
    ("crate_kernels.finetune", "crate-finetune"),
])
def test_module_entry_point(module, program, monkeypatch, tmp_path, capsys):
    """``python -m crate_kernels.<command>`` runs main() and exits with its status (run in this interpreter)."""
    monkeypatch.setattr(sys, "argv", [module, str(tmp_path / "none.pth")])
    monkeypatch.delitem(sys.modules, module, raising=False)  # run_module executes a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 1 and f"{program}: error: checkpoint" in capsys.readouterr().err
