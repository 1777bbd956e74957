"""The per-stage conda environments pin what the Python package pins."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pins(requirements):
    out = {}
    for req in requirements:
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*([=<>!~].*)?$", req.strip())
        if match:
            out[match.group(1).lower().replace("_", "-")] = (match.group(2) or "").strip()
    return out


PACKAGE = pins(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
ENVS = sorted((REPO / "envs").glob("*.yaml"))


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_match_the_package(env):
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    env_pins = pins(pip)
    assert env_pins, f"{env.name} pins nothing"
    for name, pin in env_pins.items():
        assert name in PACKAGE, f"{env.name}: {name} is not a dependency of the package"
        assert pin == PACKAGE[name], f"{env.name}: {name}{pin} but pyproject.toml has {name}{PACKAGE[name]}"


def test_every_rule_uses_one_of_the_envs():
    for rule_file in (REPO / "workflow/rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"\.\./\.\./envs/([^"]+)"', rule_file.read_text()):
            assert (REPO / "envs" / env).is_file(), f"{rule_file.name} uses missing envs/{env}"
