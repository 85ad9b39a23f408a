"""The method registry: its configs are the CLI options, the Python API's defaults and the
adapter files' settings (a new entry trained through the CLI: test_finetune_runs.py)."""
import pytest
from conftest import tiny

import pelib
from pelib import methods


def test_the_cli_options_are_the_config_fields():
    """Every field of every registry config is a finetune option, with the recipe's default
    when it is not given; options of no config are not method options."""
    import dataclasses

    from pelib.options import config_of, method_options, parse
    from pelib.recipe import flags_of

    fields = {f.name for m in methods.METHODS.values() for f in dataclasses.fields(m.config)}
    assert set(method_options()) == fields
    for name, m in methods.METHODS.items():
        assert config_of(parse(["--method", name])) == m.config()  # nothing given: the recipe
    for f, owners in method_options().values():
        assert all(flag.startswith("--") for flag in flags_of(f)) and owners
    c = config_of(parse(["--method", "sora", "--r", "4", "--gate-lr", "0.5"]))
    assert (c.r, c.alpha, c.gate_lr, c.sparse_lambda) == (4, 8, 0.5, methods.SoRAConfig.sparse_lambda)


def test_the_python_api_defaults_are_the_recipe():
    """apply_lora, TrainConfig, RankAllocator and SoRA default to what the CLI trains."""
    from pelib.adalora import AdaLoRAConfig, RankAllocator, apply_adalora
    from pelib.finetune import parse
    from pelib.lora import LoRAConfig
    from pelib.sora import SoRA, SoRAConfig
    from pelib.train import TrainConfig

    cli = parse([])
    model = pelib.apply_lora(tiny(), ["query"], r=2)
    layer = pelib.lora.lora_layers(model)[0][1]
    assert (layer.alpha, layer.scaling) == (4, 2.0)  # alpha = 2r
    assert model.pelib_adapter["lora_alpha"] == 4
    cfg = TrainConfig()
    assert (cfg.lr, cfg.head_lr, cfg.label_smoothing) == (
        methods.METHODS["lora"].lr, LoRAConfig.head_lr, LoRAConfig.label_smoothing)
    assert (cfg.epochs, cfg.batch_size, cfg.max_length, cfg.warmup_ratio, cfg.schedule) == (
        cli.epochs, cli.batch_size, cli.max_length, cli.warmup_ratio, cli.schedule)
    head = TrainConfig.of(methods.METHODS["head"].config())
    assert head.lr == head.head_lr == methods.METHODS["head"].lr  # the floor's head is the method
    assert TrainConfig.of(methods.METHODS["full"].config()).lr == methods.FullConfig.lr
    alloc = RankAllocator(apply_adalora(tiny(), ["query"]), total_step=100)
    assert (alloc.tinit, alloc.tfinal, alloc.deltaT, alloc.target_r) == (
        *AdaLoRAConfig().schedule(100), AdaLoRAConfig.delta_t, AdaLoRAConfig.target_r) == (10, 30, 10, 8)
    hook = SoRA()
    hook.schedule.begin(9)
    assert [hook.schedule(s) for s in (1, 4, 7)] == pytest.approx([0.05, 0.25, 0.45])
    assert hook.gate_lr == SoRAConfig.gate_lr == 1e-2


@pytest.mark.parametrize("method", ["lora", "qlora", "sora"])
def test_configs_round_trip_through_peft_config(tmp_path, method):
    """to_peft / from_peft: a config survives adapter_config.json, and peft reads a LORA one."""
    config = methods.METHODS[method].config(r=4, dropout=0.1, targets=["query", "value"])
    again = type(config).from_peft(dict(config.to_peft(), target_modules=["query", "value"]))
    assert again == config and again.alpha == 8
    if method != "sora":
        from peft import LoraConfig

        peer = LoraConfig(**{k: v for k, v in config.to_peft().items() if k != "peft_type"})
        assert (peer.r, peer.lora_alpha, peer.lora_dropout, peer.use_rslora) == (4, 8, 0.1, False)


def test_a_record_of_old_options_is_the_same_run():
    """Records written when every option had its old default (r 8 for every method, SoRA's
    schedule None) are the same runs as the new options that leave them out."""
    from pelib.options import options, parse
    from pelib.runs import same_run

    old = dict(options(parse(["--method", "adalora"])), r=8, alpha=None, dropout=0.0,
               rslora=False, adapter_kind="houlsby", bottleneck=64, sparse_lambda=None,
               init_r=12, target_r=8, delta_t=10, orth_reg_weight=0.5, gate_init="ones",
               threshold_scale="lr", prox_variant="exact", label_smoothing=0.1)
    assert same_run(old, options(parse(["--method", "adalora"])))
    assert not same_run(old, options(parse(["--method", "adalora", "--target-r", "4"])))
    sora = dict(old, method="sora", init_r=12)
    assert same_run(sora, options(parse(["--method", "sora", "--r", "8", "--gate-lr", "1e-2"])))
    assert not same_run(sora, options(parse(["--method", "sora", "--gate-lr", "0.5"])))
    assert not same_run(dict(old, method="gone"), options(parse([])))
