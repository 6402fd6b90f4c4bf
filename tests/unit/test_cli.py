"""The CLI: generated from the config dataclasses, light to import, values checked by type."""

import subprocess
import sys
import typing
from dataclasses import fields

import pytest

from rho1 import config as C
from rho1.cli import VERBS, parser


def test_importing_the_cli_and_refusing_an_option_import_no_torch():
    code = ("import sys; from rho1.cli import main; rc = main(['train', '--data', 'x', '--ratio', '1.5']); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False", "False", "False"], result.stderr
    assert "selection ratio must be in (0, 1]" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "rho1", "train", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--threads" in help_text.stdout and "--keep-last" in help_text.stdout


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_config_field_is_an_option_with_help(verb):
    config_cls = VERBS[verb][0]
    sub = parser()._subparsers._group_actions[0].choices[verb]
    by_dest = {a.dest: a for a in sub._actions}
    for f in fields(config_cls):
        if f.metadata.get("cli") is False:
            assert f.name not in by_dest
            continue
        assert f.name in by_dest, f.name
        assert f.metadata.get("help"), f"{config_cls.__name__}.{f.name} has no help"
        assert by_dest[f.name].default is None  # only flags given on the command line override
    if verb == "train":
        assert by_dest["score"].choices == ["excess", "retrospective", "reference", "learner", "random"]
        assert by_dest["eval_data"].nargs == "+" and by_dest["resume"].const is True
        assert "-o" in by_dest["out"].option_strings


def test_config_values_are_read_as_their_field_types():
    cfg = C.config_from_dict(C.TrainConfig, {"seq-len": "1_024", "max_tokens": "1e6", "lr": "3e-4", "eval_data": "h",
                                             "resume": True, "model": None}, "test")
    assert (cfg.seq_len, cfg.max_tokens, cfg.lr, cfg.eval_data, cfg.resume) == (1024, 1_000_000, 3e-4, ["h"], True)
    for key, value, message in (("ratio", "abc", "ratio must be a number, got 'abc'"),
                                ("seq_len", 6.5, "seq_len must be a whole number"),
                                ("resume", "yes", "resume must be true or false"),
                                ("learning_rate", 1, "unknown key 'learning_rate'")):
        with pytest.raises(ValueError, match=message):
            C.config_from_dict(C.TrainConfig, {key: value}, "test")
    hints = typing.get_type_hints(C.SweepConfig)
    assert hints["train"] is C.TrainConfig


def test_a_lost_ctrl_c_still_stops_the_stage_at_the_next_step(monkeypatch):
    import pytest

    import rho1.interrupt as C

    monkeypatch.setattr(C, "_ctrl_c", False)
    C.stop_if_ctrl_c()  # nothing pressed: nothing happens
    try:  # Python drops the KeyboardInterrupt when it is raised inside a finalizer; the flag stays
        C.on_ctrl_c()
    except KeyboardInterrupt:
        pass
    with pytest.raises(KeyboardInterrupt):
        C.stop_if_ctrl_c()
