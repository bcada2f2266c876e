"""Run configs: YAML + overrides into typed dataclasses; every mistake names its key before any work."""
import pytest

from thanora_ds.config import ConfigError
from thanora_ds.train_config import load_train_config
from run_fixtures import make_run


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cfg"))


def test_overrides_are_typed_and_applied(config):
    cfg = load_train_config(config, ["thanora.rank=12", "train.lr=1e-3", "thanora.targets=[q_proj, v_proj]",
                                     "deepspeed.overrides={zero_optimization.stage: 2}"])
    assert cfg.thanora.rank == 12 and cfg.train.lr == 1e-3 and cfg.thanora.targets == ["q_proj", "v_proj"]
    assert cfg.deepspeed.overrides == {"zero_optimization.stage": 2}
    assert cfg.model.attn_implementation == "sdpa"   # auto on a machine without CUDA/flash-attn
    assert cfg.data.sources and cfg.data.max_length == 64


@pytest.mark.parametrize("override,key", [
    ("thanora.rnak=3", "thanora.rnak"),
    ("train.lr=fast", "train.lr"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("thanora.mode=svd", "thanora.mode"),
    ("thanora.tau=-1", "thanora.tau"),
    ("thanora.spr_lambda=-0.1", "thanora.spr_lambda"),
    ("model.dtype=fp16", "model.dtype"),
    ("model.attn_implementation=flash_attention_2", "model.attn_implementation"),
    ("model.path=/nonexistent", "model.path"),
    ("deepspeed.config=nope.json", "deepspeed.config"),
    ("data.mixing=random", "data.mixing"),
    ("data.bogus=1", "bogus"),
])
def test_config_mistakes_name_the_key(config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(config, [override])


def test_deepspeed_auto_values_filled():
    from thanora_ds.ds_config import fill_deepspeed_config
    import json
    from run_fixtures import REPO
    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    filled = fill_deepspeed_config(template, micro_batch_size=4, grad_accum=2, clip=1.0, bf16=True, hidden_size=64,
                                   overrides={"zero_optimization.stage3_param_persistence_threshold": 0})
    assert filled["train_batch_size"] == 8 and filled["bf16"]["enabled"] is True
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(ValueError, match="gradient_clipping"):
        fill_deepspeed_config({"gradient_clipping": "auto", "x": {"y": "auto"}}, micro_batch_size=1, grad_accum=1,
                              clip="auto", bf16=False, hidden_size=8)


def test_zero3_model_loading_is_released_after_a_run():
    """While an HfDeepSpeedConfig is registered, every model transformers loads comes up ZeRO-3 partitioned;
    train() releases it at the end so that the same process can load models normally afterwards."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from thanora_ds import modeling
    modeling._KEEP_ALIVE[:] = [HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}})]
    assert is_deepspeed_zero3_enabled()
    modeling.release_zero3_model_loading()
    assert not is_deepspeed_zero3_enabled()


def test_a_hub_id_resolves_from_the_hugging_face_cache_offline(tmp_path):
    """model.path: org/name is looked up in the HF cache (HF_HOME), with HF_HUB_OFFLINE=1, never downloaded."""
    import shutil
    import subprocess
    import sys

    import yaml

    from run_fixtures import REPO, launch_env
    config = make_run(tmp_path / "run")
    cfg = yaml.safe_load(config.read_text())
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(cfg["model"]["path"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    cfg["model"]["path"] = "tiny-org/tiny-llama"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(launch_env(), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    check = [sys.executable, str(REPO / "launchers" / "train.py"), "--config", str(config), "--check"]
    proc = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check passed" in proc.stderr
    cfg["model"]["path"] = "tiny-org/not-cached"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "model.path: 'tiny-org/not-cached' is not a local folder" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert "hf download tiny-org/not-cached" in proc.stderr
