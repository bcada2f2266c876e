"""`train.adapters: false` (LLaVA-1.5's stage 1): the projector alone trains, language model and vision tower
frozen, no adapters and no HASI; the run merges into a plain LLaVA folder (the next stage's base model) in which
only the projector changed; a PEFT export of it is refused with a message; bad combinations fail validation."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from run_fixtures import REPO, launch, launch_env, make_run
from thanora_ds.train_config import load_train_config
from thanora_ds.typed_config import ConfigError


def test_projector_only_needs_a_projector_and_train_projector(tmp_path):
    config = make_run(tmp_path / "llava", llava=True)
    with pytest.raises(ConfigError, match=r"train\.adapters: false leaves nothing to train"):
        load_train_config(config, ["train.adapters=false", "thanora.train_projector=false"])
    text = make_run(tmp_path / "text")
    with pytest.raises(ConfigError, match=r"train\.adapters: false trains the multimodal projector alone, but"):
        load_train_config(text, ["train.adapters=false", "thanora.train_projector=true"])
    with pytest.raises(ConfigError, match=r"train\.adapters: expected true or false"):
        load_train_config(config, ["train.adapters='no'"])
    assert load_train_config(config, ["train.adapters=false"]).train.adapters is False


def test_projector_only_run_on_two_ranks_merges_with_only_the_projector_changed(tmp_path):
    config = make_run(tmp_path, llava=True, train__max_steps=2, train__adapters=False, train__lr=5e-2)
    launch(config, 2)
    out = tmp_path / "out"
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["layers"] == [] and not (out / "allocation.png").exists()
    final = load_file(str(out / "final" / "adapter_weights.safetensors"))
    assert final and all("multi_modal_projector" in k for k in final)
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "merge.py"), str(out), "--out", str(merged),
                           "--quiet"], cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = load_file(str(tmp_path / "model" / "model.safetensors"))
    new = load_file(str(merged / "model.safetensors"))
    changed = sorted(k for k in base if not torch.equal(base[k], new[k]))
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert len(changed) == len(final)                          # every projector tensor moved, nothing else
    for k, v in final.items():   # the file may use the legacy names (multi_modal_projector.* at the top level)
        key = next(f for f in changed if f.endswith("multi_modal_projector" + k.split("multi_modal_projector")[1]))
        torch.testing.assert_close(new[key], v.to(new[key].dtype))
    from transformers import AutoModelForImageTextToText
    assert type(AutoModelForImageTextToText.from_pretrained(str(merged))).__name__ == "LlavaForConditionalGeneration"
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "merge.py"), str(out), "--out",
                           str(tmp_path / "peft"), "--adapter-only"], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "trained no adapters" in proc.stderr
