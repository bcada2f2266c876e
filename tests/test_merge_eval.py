"""After training, on tiny LLaMA / LLaVA runs trained by 2 ZeRO-3 ranks: merge, PEFT export, evaluation.

The reference is the live adapted model: the base model with the adapters of ``final/adapter_weights.safetensors``,
which the trainer gathered from the running engine (an independent route from the merge, which reassembles the
ZeRO partitions of the checkpoint offline, in one process). The LLaMA run uses mode corda (the merge must undo
the residual base) and a base split over several safetensors files; the LLaVA run trains the projector.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from run_fixtures import REPO, launch, make_run
from run_fixtures import launch_env as subprocess_env

COUNT_CHOICES = ["one", "two", "three", "four", "five", "six"]


def image_only_tasks(config: Path) -> None:
    """LLaVA run with two image tasks. (A 2-rank ZeRO-3 LLaVA run whose ranks get text-only and image batches in
    the same step deadlocks in the vision tower's collectives: a trainer issue reported separately.)"""
    raw = yaml.safe_load(config.read_text())
    data = Path(raw["data"]["sources"][0]["path"]).parent
    look = json.loads((data / "look.json").read_text())
    shade = [dict(r, id=r["id"].replace("look", "shade"), task="shade", conversations=[
        {"from": "human", "value": "<image>\nlight or dark?"},
        {"from": "gpt", "value": "light" if r["conversations"][1]["value"] == "red" else "dark"}]) for r in look]
    (data / "shade.json").write_text(json.dumps(shade))
    raw["data"]["sources"] = [{"path": str(data / "look.json"), "format": "llava"},
                              {"path": str(data / "shade.json"), "format": "llava"}]
    raw["data"]["tasks"] = {"look": {"scorer": "multiple_choice", "choices": ["red", "blue"]},
                            "shade": {"scorer": "exact_match"}}
    config.write_text(yaml.safe_dump(raw))


def reshard(model_dir: Path) -> None:
    """Re-save the base over several safetensors files, so the merge streams across files."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for f in model_dir.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(model_dir, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()


@pytest.fixture(scope="module", params=["llama", "llava"])
def run(request, tmp_path_factory):
    llava = request.param == "llava"
    tmp = tmp_path_factory.mktemp(request.param)
    tasks = {"count": {"scorer": "multiple_choice", "choices": COUNT_CHOICES}, "color": {}, "story": {}}
    config = make_run(tmp, llava=llava, thanora__dropout=0.0, thanora__mode="orthogonal" if llava else "corda",
                      train__lr=2e-2, **({} if llava else {"data__tasks": tasks}))
    if llava:
        image_only_tasks(config)
    else:
        reshard(tmp / "model")
    launch(config, 2)
    return {"name": request.param, "llava": llava, "tmp": tmp, "out": tmp / "out", "base": tmp / "model",
            "config": config}


def run_script(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """One plain process, no torchrun and no rank variables."""
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / script), *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def model_class(llava: bool):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
    return LlavaForConditionalGeneration if llava else AutoModelForCausalLM


def probe_batch(run) -> dict:
    """Eval examples of every task, collated as in training."""
    from transformers import AutoProcessor, AutoTokenizer

    from thanora_ds.data import DataConfig, build_multitask_data, collate_batch

    raw = yaml.safe_load(run["config"].read_text())
    cfg = DataConfig.from_dict(raw["data"], run["tmp"])
    if run["llava"]:
        data = build_multitask_data(cfg, processor=AutoProcessor.from_pretrained(run["base"]))
    else:
        data = build_multitask_data(cfg, tokenizer=AutoTokenizer.from_pretrained(run["base"]))
    examples = [ex for t in data.tasks for ex in data.eval[t][:2]]
    batch = collate_batch(examples, data.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def live_adapted(run):
    """The adapted model as the trainer left it: base + final/ adapters (+ corda residual, trained projector)."""
    from thanora_ds.config import ThanoraConfig, from_dict
    from thanora_ds.initializer import Allocation, subtract_corda_residual
    from thanora_ds.inject import inject_thanora

    out = run["out"]
    meta = json.loads(next((out / "checkpoints").glob("step-*/thanora_meta.json")).read_text())
    model = model_class(run["llava"]).from_pretrained(run["base"], dtype=torch.float32)
    alloc = Allocation.load(out / "final" / "allocation.json")
    adapters = inject_thanora(model, from_dict(ThanoraConfig, meta["config"]["thanora"]), len(alloc.tasks))
    alloc.apply(adapters)
    weights = load_file(str(out / "final" / "adapter_weights.safetensors"))
    corda = next((out / "checkpoints").glob("step-*/corda_init.safetensors"), None)
    init = load_file(str(corda)) if corda else {}
    with torch.no_grad():
        for name, adapter in adapters.items():
            if init:
                subtract_corda_residual(adapter, init[f"{name}.corda_A0"], init[f"{name}.corda_B0"])
            adapter.lora_A.copy_(weights.pop(f"{name}.lora_A"))
            adapter.lora_B.copy_(weights.pop(f"{name}.lora_B"))
        for name, value in weights.items():   # the projector
            model.get_parameter(name).copy_(value)
    assert bool(weights) == run["llava"]
    return model.eval()


@pytest.fixture(scope="module")
def reference(run):
    batch = probe_batch(run)
    base = model_class(run["llava"]).from_pretrained(run["base"], dtype=torch.float32).eval()
    adapted = logits(live_adapted(run), batch)
    assert not torch.allclose(adapted, logits(base, batch), atol=1e-3)   # training changed the function
    return batch, base, adapted


def test_merged_model_gives_the_live_adapted_logits_and_the_base_tree(run, reference, tmp_path):
    batch, base, adapted = reference
    meta = json.loads((run["out"] / "checkpoints" / "step-00000004" / "thanora_meta.json").read_text())
    assert meta["world_size"] == 2
    proc = run_script("merge.py", str(run["out"]), "--out", str(tmp_path / "merged"), "--quiet")
    assert "peak memory (max RSS):" in proc.stdout
    merged_dir = tmp_path / "merged"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "thanora_run.json"):
        assert (merged_dir / name).is_file(), name
    if run["llava"]:
        assert (merged_dir / "processor_config.json").is_file()
    merged = model_class(run["llava"]).from_pretrained(merged_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, batch), adapted, atol=1e-5, rtol=0)
    # the base architecture, nothing more: same module tree, parameter names and shapes
    assert [(n, type(m).__name__) for n, m in merged.named_modules()] == \
           [(n, type(m).__name__) for n, m in base.named_modules()]
    assert [(n, p.shape) for n, p in merged.named_parameters()] == [(n, p.shape) for n, p in base.named_parameters()]
    # untouched weights are copied bit for bit; the projector is the trained one
    for n, p in merged.named_parameters():
        changed = not torch.equal(p, base.get_parameter(n))
        assert changed == ("multi_modal_projector" in n or ("_proj.weight" in n and "vision_tower" not in n)), n


def test_peft_export_on_the_original_base_gives_the_live_adapted_logits(run, reference, tmp_path):
    from peft import PeftModel

    batch, _, adapted = reference
    run_script("merge.py", str(run["out"]), "--out", str(tmp_path / "peft"), "--adapter-only")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == (8 if run["llava"] else 16)   # corda: rank 2r against the original base
    base = model_class(run["llava"]).from_pretrained(run["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, batch), adapted, atol=1e-5, rtol=0)
    # the auto classes rebuild the base from the adapter alone (base_model_name_or_path + task type / auto mapping)
    from peft import AutoPeftModel, AutoPeftModelForCausalLM
    auto = (AutoPeftModel if run["llava"] else AutoPeftModelForCausalLM).from_pretrained(
        tmp_path / "peft", dtype=torch.float32).eval()
    assert type(auto.get_base_model()).__name__ == type(base).__name__
    torch.testing.assert_close(logits(auto, batch), adapted, atol=1e-5, rtol=0)


def test_two_rank_checkpoint_read_in_one_process_without_process_group(run, reference, tmp_path):
    import torch.distributed as dist

    from thanora_ds.export import build_adapted_model, find_checkpoint, load_checkpoint, stream_merge

    batch, _, adapted = reference
    path = find_checkpoint(run["out"], "4")
    assert sorted(p.name for p in path.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    ckpt = load_checkpoint(path)
    assert not (dist.is_available() and dist.is_initialized())
    final = load_file(str(run["out"] / "final" / "adapter_weights.safetensors"))
    for layer, (a, b) in ckpt.lora.items():
        assert torch.equal(a, final[f"{layer}.lora_A"]) and torch.equal(b, final[f"{layer}.lora_B"])
    for name, value in ckpt.projector.items():
        assert torch.equal(value, final[name])
    assert 2 * len(ckpt.lora) + len(ckpt.projector) == len(final)
    # the unmerged model eval uses, and a merge written over several output shards
    torch.testing.assert_close(logits(build_adapted_model(ckpt), batch), adapted, atol=1e-6, rtol=0)
    stats = stream_merge(ckpt, run["base"], tmp_path / "sharded", max_shard_size="64KB", progress=False)
    assert stats["shards"] > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    merged = model_class(run["llava"]).from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, batch), adapted, atol=1e-5, rtol=0)


def test_merge_refuses_a_base_the_checkpoint_was_not_trained_on(run, tmp_path):
    if run["llava"]:
        pytest.skip("one architecture is enough for the refusal")
    from tiny_models import llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(run["base"])
    other = tmp_path / "other"
    cfg = llama_config(len(tok))
    cfg.intermediate_size = 48
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    proc = run_script("merge.py", str(run["out"]), "--out", str(tmp_path / "m"), "--base", str(other), check=False)
    assert proc.returncode == 2
    assert "config.json differs" in proc.stderr and "intermediate_size" in proc.stderr
    assert not (tmp_path / "m" / "model.safetensors").exists()
    # the recorded base is gone (moved): the shapes alone still give the mismatch away, naming the layer
    ckpt = tmp_path / "ckpt"
    shutil.copytree(find_step(run), ckpt)
    meta = json.loads((ckpt / "thanora_meta.json").read_text())
    meta["config"]["model"]["path"] = str(tmp_path / "moved")
    (ckpt / "thanora_meta.json").write_text(json.dumps(meta))
    from thanora_ds.checkpoint import write_manifest
    write_manifest(ckpt)  # the edit is deliberate: record it, or the damaged-checkpoint check would answer first
    proc = run_script("merge.py", str(ckpt), "--out", str(tmp_path / "m"), "--base", str(other), "--adapter-only",
                      check=False)
    assert proc.returncode == 2
    assert "gate_proj was trained on a [64, 32] weight" in proc.stderr and "not the base model" in proc.stderr


def find_step(run) -> Path:
    return run["out"] / "checkpoints" / (run["out"] / "checkpoints" / "latest").read_text().strip()


def test_eval_of_merged_model_equals_eval_of_live_checkpoint(run, tmp_path):
    merged = tmp_path / "merged"
    run_script("merge.py", str(run["out"]), "--out", str(merged), "--quiet")
    reports = {}
    runs = {"merged": ["--model", str(merged)], "checkpoint": ["--checkpoint", str(run["out"])]}
    if not run["llava"]:
        runs["base"] = ["--checkpoint", str(run["out"]), "--zero-shot"]
    for name, source in runs.items():
        proc = run_script("eval.py", *source, "--out", str(tmp_path / name), "--max-new-tokens", "6",
                          "--batch-size", "3")
        assert "tokens/s" in proc.stdout and "| task | scorer | n | score | loss |" in proc.stdout
        report = json.loads((tmp_path / name / "eval.json").read_text())
        predictions = [json.loads(l) for l in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        assert (tmp_path / name / "eval.md").read_text().startswith("### ")
        reports[name] = (report, predictions)
    tasks = ["look", "shade"] if run["llava"] else ["color", "count", "story"]
    merged_report, merged_preds = reports["merged"]
    ckpt_report, ckpt_preds = reports["checkpoint"]
    assert list(merged_report["tasks"]) == tasks
    assert merged_report["tasks"]["look" if run["llava"] else "count"]["scorer"] == "multiple_choice"
    for task in tasks:
        m, c = merged_report["tasks"][task], ckpt_report["tasks"][task]
        assert m["n"] == 4 and m["loss_tokens"] > 0          # eval_samples 4 per task
        assert m["loss"] == pytest.approx(c["loss"], abs=1e-5)
        assert m["score"] == c["score"]
        # the task's score is the mean of its per-example scores
        mine = [p["score"] for p in merged_preds if p["task"] == task]
        assert m["score"] == pytest.approx(sum(mine) / len(mine))
    assert [p["prediction"] for p in merged_preds] == [p["prediction"] for p in ckpt_preds]
    assert merged_report["generation"]["tokens"] > 0 and merged_report["generation"]["tokens_per_s"] > 0
    if "base" in reports:   # zero-shot reference: same examples, the base model's (different) losses
        base_report = reports["base"][0]
        assert [p["id"] for p in reports["base"][1]] == [p["id"] for p in merged_preds]
        assert all(base_report["tasks"][t]["loss"] != pytest.approx(merged_report["tasks"][t]["loss"], abs=1e-4)
                   for t in tasks)


def test_per_task_generation_cap_overrides_the_evaluator_default(tmp_path):
    """data.tasks.<task>.max_new_tokens caps that task's generation; other tasks use the evaluator's cap."""
    from tiny_assets import make_llama_tokenizer
    from tiny_models import llama_config
    from transformers import LlamaForCausalLM

    from thanora_ds.data import DataConfig, SourceConfig, build_multitask_data
    from thanora_ds.evaluate import evaluate

    tok = make_llama_tokenizer(tmp_path / "tok")
    rows = [{"prompt": f"Add {i} and {j}.", "response": str(i + j), "task": "add"} for i in range(4) for j in range(4)]
    rows += [{"prompt": f"Tell a story about {i}.", "response": "Once upon a time.", "task": "story"} for i in range(16)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=[SourceConfig(str(tmp_path / "d.jsonl"))], preview_samples=2, eval_samples=3,
                     tasks={"add": {"scorer": "numeric", "max_new_tokens": 2}, "story": {}})
    data = build_multitask_data(cfg, tokenizer=tok)
    model_cfg = llama_config(len(tok))
    model_cfg.eos_token_id = None          # a random model must not stop early: every answer runs to its cap
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_cfg).eval()
    model.generation_config.eos_token_id = None
    report = evaluate(model, data, tok, batch_size=2, max_new_tokens=5, with_loss=False)
    assert report["tasks"]["add"]["generated_tokens"] == 3 * 2
    assert report["tasks"]["story"]["generated_tokens"] == 3 * 5
    with pytest.raises(ValueError, match="data.tasks.add.max_new_tokens"):
        DataConfig(sources=cfg.sources, tasks={"add": {"max_new_tokens": 0}})
