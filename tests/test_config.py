import dataclasses

import pytest
import yaml

from pipeline.config import Config, ConfigError, builtin_configs, load_config, parse_set_options


def test_default_yaml_matches_builtin_defaults():
    """configs/default.yaml lists exactly the built-in (paper) defaults."""
    data = yaml.safe_load((builtin_configs() / "default.yaml").read_text())
    assert data == Config().to_dict()


def test_paper_values_are_defaults():
    cfg = load_config("default")
    assert (cfg.tiling.tile_px, cfg.tiling.overlap_px, cfg.tiling.mpp) == (512, 128, 0.5)
    assert cfg.tiling.stride_px == 384


def test_tiny_config_loads_and_overrides():
    cfg = load_config("tiny", {"tiling.mpp": "1.0", "store.codec": "zstd"})
    assert cfg.tiling.tile_px == 128
    assert cfg.tiling.mpp == 1.0
    assert cfg.store.codec == "zstd"


def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tiling:\n  tile_pz: 256\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'tile_pz'.*did you mean 'tile_px'"):
        load_config(p)


def test_unknown_section_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tilling:\n  mpp: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'tilling'.*'tiling'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key 'mmp'"):
        load_config(None, {"tiling.mmp": 1})
    with pytest.raises(ConfigError, match="SECTION.KEY"):
        load_config(None, {"mpp": 1})


def test_wrong_types_and_values():
    with pytest.raises(ConfigError, match="tiling.tile_px: expected an integer"):
        load_config(None, {"tiling.tile_px": "big"})
    with pytest.raises(ConfigError, match="overlap_px"):
        load_config(None, {"tiling.overlap_px": 600})
    with pytest.raises(ConfigError, match="store.codec"):
        load_config(None, {"store.codec": "png"})


def test_missing_config_names_builtins():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("nope")


def test_set_options_parse_yaml_scalars():
    assert parse_set_options(["tiling.mpp=1.5", "tiling.fast_read=false"]) == {
        "tiling.mpp": 1.5,
        "tiling.fast_read": False,
    }
    with pytest.raises(ConfigError):
        parse_set_options(["tiling.mpp"])


def test_tiling_hash_ignores_performance_knobs_only():
    a = load_config(None)
    b = load_config(None, {"tiling.block_tiles": 3, "runtime.workers": 7})
    c = load_config(None, {"store.jpeg_quality": 80})
    assert a.tiling_hash() == b.tiling_hash()
    assert a.tiling_hash() != c.tiling_hash()
