"""The conventional CLI: global --threads and --verbose, third-party logs captured, device names in help."""

from __future__ import annotations

import logging

import pytest
from edgediff.exporters import base

from edgediff.cli import main, quiet_third_party


def test_threads_option_reaches_the_runtimes(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "recipes", "--json"]) == 0
        assert base.threads() == 1 and torch.get_num_threads() == 1
    finally:
        base.set_threads(None)
        torch.set_num_threads(before)
    assert main(["--threads", "0", "recipes"]) == 2  # out of range: a usage error
    capsys.readouterr()


def test_third_party_logs_hidden_unless_verbose() -> None:
    log = logging.getLogger("coremltools")
    log.setLevel(logging.NOTSET)
    quiet_third_party(verbose=True)
    assert log.getEffectiveLevel() < logging.ERROR or log.level == logging.NOTSET
    quiet_third_party(verbose=False)
    assert log.level == logging.ERROR and logging.getLogger("absl").level == logging.ERROR


def test_profile_help_lists_device_names(capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.profiling.estimate import device_names

    main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in device_names():
        assert name in text
