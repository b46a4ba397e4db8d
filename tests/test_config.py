"""RunConfig: validation naming the field, TOML round trip, --set overrides, shipped configs."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from moelab.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_from_toml,
    config_to_dict,
    dump_toml,
    load_config,
    parse_value,
    resolve_config_path,
    shipped_configs,
)
from moelab.methods.default_moe import DefaultMoEConfig
from moelab.methods.excitation import ExcitationConfig
from moelab.methods.momentum import MomentumConfig
from moelab.models.config import ModelConfig
from moelab.moe import MoEConfig


def with_sets(*overrides: str, base: RunConfig | None = None) -> RunConfig:
    return config_from_dict(apply_overrides(config_to_dict(base or RunConfig()), list(overrides)))


def rich_config() -> RunConfig:
    """Every optional part switched on, odd floats, a path with quotes and backslashes."""
    return RunConfig(
        name="rich.run-1",
        model=ModelConfig(d_model=96, n_heads=3, n_layers=3, moe_every=2, d_ff_dense=200,
                          moe=MoEConfig(n_experts=6, top_k=3, capacity_factor=1.25,
                                        z_loss_coef=1e-3),
                          default_moe=DefaultMoEConfig(beta=0.95, scored=True),
                          momentum=MomentumConfig(rule="heavy_ball", mu=0.3, gamma=0.9),
                          dropout=0.1),
        data=DataConfig(dataset="textfile", path='C:\\data\\"my" file.txt', seq_len=64,
                        batch_size=4, eval_batches=3),
        optim=OptimConfig(name="sgd", lr=0.1 + 0.2, betas=(0.8, 0.999), warmup_frac=0.05,
                          schedule="linear", min_lr_ratio=0.0, grad_clip=0.0,
                          excitation=ExcitationConfig(strategy="random", gamma=2.0, seed=7)),
        train=TrainConfig(steps=10, eval_every=0, seed=3, out_dir="runs/x", grad_accum=2,
                          deterministic=False),
    )


# ------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("cfg", [RunConfig(), rich_config()], ids=["default", "rich"])
def test_toml_round_trip(cfg):
    text = dump_toml(cfg, header="a header\nover two lines")
    back = config_from_toml(text)
    assert back == cfg
    assert dump_toml(back, header="a header\nover two lines") == text
    assert back.optim.betas == cfg.optim.betas and isinstance(back.optim.betas, tuple)


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert config_from_toml(dump_toml(cfg)) == cfg


def _walk(cls, seen=None):
    seen = set() if seen is None else seen
    if cls in seen:
        return
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield cls, f, hints[f.name]
        for arg in (hints[f.name], *typing.get_args(hints[f.name])):
            if dataclasses.is_dataclass(arg):
                yield from _walk(arg, seen)


def test_every_optional_field_defaults_to_none():
    # what makes "left out of the TOML" and "None" the same thing, so the round trip is exact
    for cls, f, tp in _walk(RunConfig):
        if type(None) in typing.get_args(tp):
            assert f.default is None, f"{cls.__name__}.{f.name} is optional but defaults to " \
                                      f"{f.default!r}"


def test_shipped_presets_are_variations_of_default():
    base = load_config("default")
    dmoe, mom, exc = load_config("default_moe"), load_config("momentum"), load_config("excitation")
    assert dmoe.model.default_moe == DefaultMoEConfig(beta=0.9)
    assert dataclasses.replace(dmoe.model, default_moe=None) == base.model
    assert mom.model.momentum.rule == "heavy_ball"
    assert exc.optim.excitation is not None and exc.optim.excitation.strategy == "positive_sum"
    assert exc.train == base.train and exc.data == base.data
    assert load_config("mnist").model.kind == "vit"
    assert load_config("mnist_mlp").model.kind == "mlp"


# ------------------------------------------------------------------------ overrides


def test_overrides_parse_toml_literals_and_build_optional_tables():
    cfg = with_sets("model.moe.n_experts=16", "optim.lr=1e-3", "optim.betas=[0.9, 0.99]",
                    "model.default_moe.beta=0.95", "optim.excitation.strategy=zero_sum",
                    "train.out_dir=runs/my run", "data.eval_batches=4", "model.first_dense=true")
    assert cfg.model.moe.n_experts == 16 and cfg.optim.lr == 1e-3
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.default_moe == DefaultMoEConfig(beta=0.95)
    assert cfg.optim.excitation == ExcitationConfig(strategy="zero_sum")
    assert cfg.train.out_dir == "runs/my run"
    assert cfg.model.first_dense is True and cfg.data.eval_batches == 4
    off = with_sets("model.default_moe=none", "data.eval_batches=none",
                    "optim.excitation=None", base=cfg)
    assert off.model.default_moe is None and off.data.eval_batches is None
    assert off.optim.excitation is None
    # re-enable after disabling, in one command line
    again = with_sets("model.default_moe=none", "model.default_moe.scored=true", base=cfg)
    assert again.model.default_moe == DefaultMoEConfig(scored=True)


def test_parse_value():
    assert parse_value("16") == 16 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value('"16"') == "16"
    assert parse_value("zero_sum") == "zero_sum" and parse_value("runs/a b") == "runs/a b"


@pytest.mark.parametrize("overrides,match", [
    (["optim.lr=-1"], r"^optim\.lr=-1\.0 is invalid: need lr > 0"),
    (["optim.name=rmsprop"], r"^optim\.name='rmsprop' is invalid"),
    (["model.n_heads=3"], r"^model\.n_heads=3 is invalid"),
    (["model.moe.top_k=9"], r"^model\.moe\.top_k=9 is invalid"),  # MoEConfig's own check
    (["model.default_moe.beta=1.5"], r"^model\.default_moe\.beta=1\.5 is invalid"),
    (["model.momentum.mu=2"], r"^model\.momentum\.mu=2\.0 is invalid"),
    (["optim.excitation.gamma=-1"], r"^optim\.excitation\.gamma=-1\.0 is invalid"),
    (["model.moe.n_experts=abc"], r"^model\.moe\.n_experts='abc' is invalid: need an int"),
    (["model.moe.n_experts=2.5"], r"^model\.moe\.n_experts=2\.5 is invalid: need an int"),
    (["model.default_moe=true"], r"^model\.default_moe=True is invalid: need a table or none"),
    (["model=3"], r"^model=3 is invalid: need a table"),
    (["train.steps=none"], r"^train\.steps='none' is invalid: need an int"),
    (["optim.betas=[0.9]"], r"^optim\.betas=\[0\.9\] is invalid"),
    (["data.dataset=mnist5k"], r"^data\.dataset='mnist5k' is invalid: model\.kind='lm' needs "),
    (["data.dataset=imagenet"], r"^data\.dataset='imagenet' is invalid: choose one of"),
    (["data.seq_len=512"], r"^data\.seq_len=512 is invalid: need <= model\.max_seq_len"),
    (["optim.warmup_steps=5", "optim.warmup_frac=0.1"], r"^optim\.warmup_frac=0\.1 .*not both"),
    (["train.device=gpu"], r"^train\.device='gpu' is invalid"),
])
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        with_sets(*overrides)


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], r"unknown key 'optim\.lrr'; did you mean optim\.lr\?"),
    (["model.moe.n_expert=4"], r"unknown key 'model\.moe\.n_expert'; did you mean "
                               r"model\.moe\.n_experts\?"),
    (["modle.d_model=4"], r"unknown key 'modle'; did you mean model\?"),
    (["model.default_moe.betta=0.9"], r"'model\.default_moe\.betta'; did you mean "
                                      r"model\.default_moe\.beta\?"),
    (["train.zzz=1"], r"unknown key 'train\.zzz'; known keys: steps, eval_every"),
])
def test_unknown_keys_suggest_close_matches(overrides, match):
    with pytest.raises(ConfigError, match=match):
        with_sets(*overrides)


@pytest.mark.parametrize("item,match", [
    ("model.moe.n_experts", r"bad --set 'model\.moe\.n_experts': expected KEY=VALUE"),
    ("=3", r"bad --set '=3'"),
    ("model..x=3", r"bad --set"),
    ("model.moe.n_experts.x=1", r"model\.moe\.n_experts is a value \(8\), not a table"),
])
def test_malformed_set(item, match):
    with pytest.raises(ConfigError, match=match):
        with_sets(item)


def test_errors_are_one_line():
    for sets in (["optim.lr=-1"], ["optim.lrr=1"], ["model.moe.top_k=9"]):
        with pytest.raises(ValueError) as e:
            with_sets(*sets)
        assert "\n" not in str(e.value)


def test_direct_construction_validates():
    # built directly, a dataclass names its bare field (the loader adds the dotted path)
    with pytest.raises(ValueError, match=r"^lr=-1 is invalid"):
        OptimConfig(lr=-1)
    with pytest.raises(ValueError, match=r"^grad_accum=0 is invalid"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match=r"^batch_size=0 is invalid"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"^momentum\.adam_layers=9 is invalid"):
        ModelConfig(momentum=MomentumConfig(rule="adam", adam_layers=9))
    with pytest.raises(ValueError, match=r"name='a b' is invalid"):
        RunConfig(name="a b")


# ------------------------------------------------------------------------ files


def test_load_file_with_base_and_name_from_stem(tmp_path):
    f = tmp_path / "my_exp.toml"
    f.write_text('base = "default"\n[model.moe]\nn_experts = 4\n[optim]\nlr = 1e-3\n')
    cfg = load_config(f, ["train.steps=7"])
    default = load_config("default")
    assert cfg.name == "default"  # inherited from the base file's `name`
    assert cfg.model.moe.n_experts == 4 and cfg.optim.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.model.d_model == default.model.d_model and cfg.data == default.data
    g = tmp_path / "other.toml"
    g.write_text("[train]\nsteps = 5\n")
    assert load_config(g).name == "other"
    # a base given as a path is resolved relative to the file
    h = tmp_path / "child.toml"
    h.write_text('base = "other.toml"\n[train]\nseed = 4\n')
    child = load_config(h)
    assert child.train.steps == 5 and child.train.seed == 4


def test_base_loop_and_bad_toml(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('base = "b.toml"\n')
    b.write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="loop"):
        load_config(a)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn = 1\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.learning_rate'"):
        load_config(unknown)


def test_resolve_names():
    assert resolve_config_path("default").name == "default.toml"
    assert resolve_config_path("default.toml").name == "default.toml"
    with pytest.raises(ConfigError, match=r"did you mean 'default'\?"):
        resolve_config_path("defualt")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("/no/such/file.toml")
    assert "default" in shipped_configs() and shipped_configs()["default"]


# ------------------------------------------------------------------------ schedule


def test_lr_schedule_warmup_then_cosine_to_min():
    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    f = [o.lr_factor(s, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    mid = o.lr_factor(10 + 99 // 2, 110)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert OptimConfig(warmup_frac=0.1).warmup(200) == 20
    assert OptimConfig(schedule="constant").lr_factor(50, 100) == 1.0
    assert OptimConfig(schedule="linear", min_lr_ratio=0.0).lr_factor(99, 100) == 0.0


@pytest.mark.parametrize("old", ["n_experts", "top_k", "d_ff", "activation", "normalize_topk",
                                 "capacity_factor", "aux_loss_coef", "z_loss_coef", "dispatch"])
def test_old_flat_moe_keys_name_the_new_key(old, tmp_path):
    new = rf"'model\.moe\.{old}'"
    with pytest.raises(ConfigError, match=rf"^key 'model\.{old}' moved to {new}"):
        with_sets(f"model.{old}=1")
    f = tmp_path / "old.toml"
    f.write_text(f'base = "default"\n[model]\n{old} = 1\n')
    with pytest.raises(ConfigError, match=rf"moved to {new}"):
        load_config(f)


def test_moe_table_is_the_layer_config_and_nested_errors_carry_the_path():
    cfg = with_sets("model.moe.n_experts=16", "model.moe.top_k=4", "model.d_model=64",
                    "model.n_heads=4")
    assert cfg.model.moe == MoEConfig(n_experts=16, top_k=4)
    assert cfg.model.moe_config() == MoEConfig(d_model=64, n_experts=16, top_k=4)
    with pytest.raises(ConfigError, match=r"^model\.moe\.d_model=32 is invalid: leave it unset"):
        with_sets("model.moe.d_model=32")
    with pytest.raises(ConfigError, match=r"^model\.momentum\.adam_layers=9 is invalid"):
        with_sets("model.momentum.rule=adam", "model.momentum.adam_layers=9")
