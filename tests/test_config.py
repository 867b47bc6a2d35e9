"""The config schema: typed dataclasses from YAML presets and dotted overrides, with loud errors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal, Optional

import pytest

from megatron_eopd.config import ConfigError, apply_overrides, build_config, from_dict, to_dict


@dataclasses.dataclass
class _Loss:
    tau: float = 0.8
    topk: int = 16
    gate: Literal["hard", "ramp"] = "hard"

    def __post_init__(self):
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")


@dataclasses.dataclass
class _Run:
    name: str = "run"
    out_dir: Path = Path("runs")
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1])
    resume: Optional[str] = None
    loss: _Loss = dataclasses.field(default_factory=_Loss)


def test_defaults_preset_and_overrides_compose(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nloss:\n  tau: 1.0\n  topk: 32\n")
    child = tmp_path / "child.yaml"
    child.write_text("defaults: base.yaml\nloss:\n  gate: ramp\n")
    cfg = build_config(_Run, child, ["loss.tau=inf", "seeds=[3, 4]", "out_dir=/tmp/x"])
    assert cfg.name == "base"
    assert cfg.loss.topk == 32 and cfg.loss.gate == "ramp"
    assert math.isinf(cfg.loss.tau)
    assert cfg.seeds == [3, 4] and cfg.out_dir == Path("/tmp/x")
    assert to_dict(cfg)["out_dir"] == "/tmp/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.tua=1", "unknown config key(s) in 'loss': tua"),
        ("loss.topk=abc", "loss.topk: expected an integer"),
        ("loss.gate=soft", "loss.gate: 'soft' is not one of"),
        ("loss.topk=0", "loss: topk must be >= 1"),
        ("loss=3", "loss: expected a mapping"),
        ("nokey", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(_Run, None, [override])
    assert message in str(err.value)


def test_missing_and_malformed_preset(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(_Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        build_config(_Run, bad)


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(_Loss, {"topk": True})


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 3e-3 as a string; users write learning rates that way on the command line.
    cfg = build_config(_Run, None, ["loss.tau=3e-3"])
    assert cfg.loss.tau == pytest.approx(0.003)
    with pytest.raises(ConfigError, match="loss.tau: expected a number, got 'fast'"):
        build_config(_Run, None, ["loss.tau=fast"])
