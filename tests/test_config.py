import pytest

from mfcache.config import HeadConfig, RunConfig, parse_overrides, preset_names, resolve_run_config
from mfcache.errors import MfcacheError


def test_defaults_follow_the_paper_recipe():
    train = RunConfig().train
    assert (train.lr, train.betas, train.weight_decay, train.batch_size) == (1.5e-4, (0.9, 0.999), 5e-5, 8)
    assert train.lr_drops == (0.9, 0.95)


def test_preset_then_overrides_in_that_order(tmp_path):
    head_file = tmp_path / "mine.toml"
    head_file.write_text("roi_size = 64\n[train]\nsteps = 7\nlr = 1e-3\n")
    config = resolve_run_config(str(head_file), ["train.steps=9", "head.use_c1=false", "train.betas=[0.8, 0.9]"])
    assert config.head == HeadConfig(name="mine", roi_size=64, use_c1=False)
    assert (config.train.steps, config.train.lr, config.train.betas) == (9, 1e-3, (0.8, 0.9))


def test_round_trip_through_dict():
    config = resolve_run_config("box_baseline", ["train.steps=3"])
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "bad, message",
    [
        (["train.nope=1"], "unknown train option"),
        (["steps=1"], "`overrides` expects"),
        (["train.steps=abc"], "expected int"),
        (["head.use_c1=1"], "expected true or false"),
    ],
)
def test_bad_overrides_are_clear_errors(bad, message):
    with pytest.raises(MfcacheError, match=message):
        resolve_run_config(None, bad)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(MfcacheError, match="box_baseline"):
        resolve_run_config("no_such_head")
    assert "box_baseline" in preset_names()


def test_parse_overrides_types():
    assert parse_overrides(["eval.mask_threshold=0.4", "head.name=x"]) == {
        "eval": {"mask_threshold": 0.4},
        "head": {"name": "x"},
    }
