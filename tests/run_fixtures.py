"""A complete tiny training setup on disk (model dir via save_pretrained, tokenizer/processor, JSONL data,
run config) and helpers to launch launchers/train.py with 1 or 2 CPU ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from thanora_ds.distributed import free_port

from tiny_assets import make_llama_tokenizer, make_llava_processor
from tiny_models import llama_config, llava_config

REPO = Path(__file__).resolve().parent.parent
TASK_WORDS = {  # three tasks with different vocabularies and answer lengths
    "count": (["one", "two", "three", "four", "five", "six"], 1),
    "color": (["red", "green", "blue", "yellow", "black", "white", "pink", "gray"], 2),
    "story": (["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "home", "fast"], 6),
}


def write_data(folder: Path, records_per_task: int = 24, seed: int = 0, image: str | None = None) -> list[str]:
    """prompt/response JSONL per task (and an LLaVA JSON file when ``image`` is given)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for task, (words, answer_len) in TASK_WORDS.items():
        path = folder / f"{task}.jsonl"
        with open(path, "w") as f:
            for i in range(records_per_task):
                pick = lambda n: " ".join(words[int(j)] for j in torch.randint(len(words), (n,), generator=g))
                f.write(json.dumps({"id": f"{task}-{i}", "prompt": f"say {task}: {pick(3)}",
                                    "response": pick(answer_len), "task": task}) + "\n")
        sources.append({"path": path.name, "format": "prompt_response"})
    if image is not None:
        from PIL import Image
        (folder / "images").mkdir(exist_ok=True)
        recs = []
        for i in range(records_per_task):
            color = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
            Image.new("RGB", (28, 28), color).save(folder / "images" / f"img{i}.png")
            recs.append({"id": f"look-{i}", "image": f"img{i}.png", "task": "look",
                         "conversations": [{"from": "human", "value": "<image>\nwhat color?"},
                                           {"from": "gpt", "value": "red" if color[0] > 127 else "blue"}]})
        (folder / "look.json").write_text(json.dumps(recs))
        sources.append({"path": "look.json", "format": "llava"})
    return sources


def make_run(tmp: Path, llava: bool = False, seed: int = 0, **overrides) -> Path:
    """Model + tokenizer + data + config.yaml under ``tmp``; returns the config path."""
    model_dir = tmp / "model"
    if llava:
        processor = make_llava_processor(model_dir)
        tok = processor.tokenizer
        config = llava_config(len(tok), tok.convert_tokens_to_ids("<image>"))
        from transformers import LlavaForConditionalGeneration as cls
    else:
        tok = make_llama_tokenizer(model_dir)
        config = llama_config(len(tok))
        from transformers import LlamaForCausalLM as cls
    torch.manual_seed(seed)
    text = getattr(config, "text_config", config)
    text.pad_token_id, text.eos_token_id = tok.pad_token_id, tok.eos_token_id
    cls(config).save_pretrained(model_dir)
    sources = write_data(tmp / "data", image="yes" if llava else None)
    cfg = {
        "model": {"path": str(model_dir), "dtype": "fp32", "attn_implementation": "auto",
                  "activation_checkpointing": True},
        "data": {"sources": [dict(s, path=str(tmp / "data" / s["path"])) for s in sources],
                 "image_folder": str(tmp / "data" / "images") if llava else None,
                 "max_length": 64, "preview_samples": 8, "eval_samples": 4, "seed": 0, "mixing": "temperature"},
        "thanora": {"rank": 8, "alpha": 16, "dropout": 0.1, "spr_lambda": 0.05, "mode": "orthogonal",
                    "train_projector": llava},
        "train": {"output_dir": str(tmp / "out"), "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                  "max_steps": 4, "lr": 5e-3, "warmup_steps": 1, "max_grad_norm": 1.0, "adam_eps": 1e-8, "save_every": 0, "keep_last": 2,
                  "preview_batch_size": 3, "seed": 1, "report_to": ["tensorboard"]},
        "deepspeed": {"config": "ds_configs/zero3.json",
                      "overrides": {"zero_optimization.stage3_param_persistence_threshold": 0}},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch(config: Path, nproc: int, *overrides: str, env_extra: dict | None = None, timeout: int = 600,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run launchers/train.py with torchrun (nproc ranks, gloo on CPU); nproc=0: plain python, no launcher."""
    script = [str(REPO / "launchers" / "train.py"), "--config", str(config), *overrides]
    if nproc == 0:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script]
    env = launch_env()
    env.update(env_extra or {})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def run_probe(tmp: Path, script: str, timeout: int = 300) -> dict:
    """Run ``script`` (a template with {repo} and {config}: a run config made by make_run) in a fresh process and
    return the JSON it prints after ``RESULT``."""
    import json
    import subprocess
    import sys

    config = make_run(tmp, train__gradient_accumulation_steps=1)
    path = tmp / "probe.py"
    path.write_text(script.format(repo=str(REPO), config=str(config)))
    proc = subprocess.run([sys.executable, str(path)], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
