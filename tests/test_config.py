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


def test_image_mode_epochs_have_their_own_count():
    """em.mil_epochs sets every image-mode round's epochs (each MIL epoch ranks all training tiles); the
    other modes, and image mode without it, keep epochs_init for round 0 and epochs after."""
    e = load_config(None, {"em.epochs_init": 120, "em.epochs": 8, "em.mil_epochs": 10}).em
    assert [e.theta1_epochs(k) for k in (0, 1, 2)] == [120, 8, 8]  # mode mixed: mil_epochs is not used
    e = load_config(None, {"em.mode": "image", "em.epochs_init": 120, "em.epochs": 8, "em.mil_epochs": 10}).em
    assert [e.theta1_epochs(k) for k in (0, 1, 2)] == [10, 10, 10]
    e = load_config(None, {"em.mode": "image", "em.epochs_init": 120, "em.epochs": 8}).em
    assert [e.theta1_epochs(k) for k in (0, 1)] == [120, 8]
    with pytest.raises(ConfigError, match="em.mil_epochs must be >= 0"):
        load_config(None, {"em.mil_epochs": -1})


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


# --------------------------------------------------------------------------- model constructor arguments


def test_arch_kwargs_from_yaml_set_and_overrides(tmp_path):
    assert load_config(None).model.seg_arch_kwargs == {} and Config().model.cls_arch_kwargs == {}
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  seg_arch_kwargs:\n    width_mult: 0.5\n    channels: [8, 8, 16, 32, 64, 128]\n"
                 "  cls_arch_kwargs:\n")
    cfg = load_config(p)
    assert cfg.model.seg_arch_kwargs == {"width_mult": 0.5, "channels": [8, 8, 16, 32, 64, 128]}
    assert cfg.model.cls_arch_kwargs == {}  # an empty YAML value: the defaults
    opts = parse_set_options(["model.seg_arch_kwargs={width: 16}", "model.cls_arch_kwargs={drop_rate: 0.2}"])
    assert opts == {"model.seg_arch_kwargs": {"width": 16}, "model.cls_arch_kwargs": {"drop_rate": 0.2}}
    cfg = load_config(None, opts)
    assert cfg.model.seg_arch_kwargs == {"width": 16} and cfg.model.cls_arch_kwargs == {"drop_rate": 0.2}
    assert load_config(None, {"model.seg_arch_kwargs": "{head_chs: 32}"}).model.seg_arch_kwargs == {"head_chs": 32}
    assert cfg.to_dict()["model"]["seg_arch_kwargs"] == {"width": 16}


def test_arch_kwargs_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.seg_arch_kwargs: expected a mapping"):
        load_config(None, {"model.seg_arch_kwargs": "[1, 2]"})
    with pytest.raises(ConfigError, match="model.cls_arch_kwargs: expected a mapping"):
        load_config(None, {"model.cls_arch_kwargs": 3})
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  seg_arch_kwargs: {1: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: model.seg_arch_kwargs: keys must be names"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"model.seg_arch_kwargs must not set \['num_classes'\]"):
        load_config(None, {"model.seg_arch_kwargs": {"num_classes": 2}})


def test_arch_kwargs_and_optimizers_enter_train_hash_only():
    base = load_config(None)
    a = load_config(None, {"model.seg_arch_kwargs": {"width_mult": 0.5, "head_chs": 16}})
    b = load_config(None, {"model.seg_arch_kwargs": {"head_chs": 16, "width_mult": 0.5}})
    c = load_config(None, {"model.cls_arch_kwargs": {"width_mult": 0.5, "head_chs": 16}})
    assert a.train_hash() == b.train_hash() != base.train_hash()  # key order does not matter
    assert c.train_hash() not in (a.train_hash(), base.train_hash())
    assert a.tiling_hash() == base.tiling_hash()
    hashes = {load_config(None, {f"{sec}.optimizer": o}).train_hash() for sec in ("em", "stage2") for o in ("adamw", "sgd")}
    assert len(hashes) == 4 and base.train_hash() not in hashes


def test_optimizer_choice_with_did_you_mean():
    cfg = load_config(None)
    assert (cfg.em.optimizer, cfg.stage2.optimizer) == ("adam", "adam")  # the paper's
    assert load_config(None, {"em.optimizer": "sgd", "stage2.optimizer": "adamw"}).stage2.optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"em.optimizer must be one of \['adam', 'adamw', 'sgd'\], got 'adamW'.*did you mean 'adamw'"):
        load_config(None, {"em.optimizer": "adamW"})
    with pytest.raises(ConfigError, match="stage2.optimizer .*got 'sdg'.*did you mean 'sgd'"):
        load_config(None, {"stage2.optimizer": "sdg"})


# --------------------------------------------------------------------------- size divisor per architecture


@pytest.fixture
def scratch_models():
    pytest.importorskip("torch")
    from models import registry

    saved = dict(registry._model_entrypoints), dict(registry._model_size_divisors)
    yield registry
    for live, old in zip((registry._model_entrypoints, registry._model_size_divisors), saved):
        live.clear()
        live.update(old)


def test_training_check_uses_each_architectures_divisor(scratch_models):
    import torch.nn as nn

    @scratch_models.register_model("toy_patch_test", size_divisor=lambda patch=16, **kw: patch)
    def toy(patch=16, **kw):
        return nn.Identity()

    Config().validate_for_training()  # DLA34: 512 is a multiple of 32
    cfg = load_config(None, {"model.cls_arch": "toy_patch_test", "model.cls_arch_kwargs": {"patch": 48}})
    assert cfg.model_size_divisors() == {"seg_arch": 32, "cls_arch": 48}
    with pytest.raises(ConfigError, match=r"tiling.tile_px=512 is not a multiple of 48: model.cls_arch='toy_patch_test' "
                                          r"needs inputs whose side is a multiple of 48; re-tile with tiling.tile_px=480 or 576"):
        cfg.validate_for_training()
    cfg.validate_for_training(tile_px=96)  # a multiple of 32 and 48
    with pytest.raises(ConfigError, match=r"stores=100 is not a multiple of 32: model.seg_arch='dla34_up'.*96 or 192"):
        cfg.validate_for_training(tile_px=100, where="stores")
    load_config(None, {"model.cls_arch": "toy_patch_test"}).validate_for_training()  # patch 16 by default
    with pytest.raises(ConfigError, match="model.cls_arch_kwargs=.*do not suit 'toy_patch_test'"):
        load_config(None, {"model.cls_arch": "toy_patch_test", "model.cls_arch_kwargs": {"patch": 0}}).validate_for_training()
    with pytest.raises(ConfigError, match="model.seg_arch='dla34_upp' is not a registered model; choose one of .*dla34_up"):
        load_config(None, {"model.seg_arch": "dla34_upp"}).validate_for_training()
