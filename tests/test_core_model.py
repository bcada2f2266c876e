"""The method on tiny LLaMA / LLaVA models: PEFT equivalence, step-0 exactness, merge and PEFT export."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from thanora_ds.config import ConfigError, ThanoraConfig
from thanora_ds.hasi import common_prefix_length
from thanora_ds.initializer import Allocation, run_hasi
from thanora_ds.inject import inject_thanora, spr_loss, thanora_modules
from thanora_ds.merge import export_peft, merge_into_base
from tiny_models import synthetic_batches, tiny_llama, tiny_llava

T = 3


def forward_batch(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}


def logits(model, batch):
    with torch.no_grad():
        return model(**forward_batch(batch)).logits


def setup(cfg, llava=False, seed=0):
    model = tiny_llava(seed) if llava else tiny_llama(seed)
    base = copy.deepcopy(model)
    batches = synthetic_batches(T, llava=llava)
    adapters = inject_thanora(model, cfg, T)
    prefix = common_prefix_length([row.tolist() for task in batches for b in task for row in b["input_ids"]])
    alloc = run_hasi(model, adapters, cfg, [f"task{t}" for t in range(T)], lambda t: batches[t], prefix)
    return model, base, adapters, alloc, batches


def test_random_uniform_no_spr_equals_peft_lora():
    cfg = ThanoraConfig(rank=8, alpha=16, dropout=0.0, mode="random", allocation="uniform", spr_lambda=0.0)
    model, base, adapters, _, batches = setup(cfg)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=cfg.targets))
    # same A/B values (B made non-zero so the adapter path matters)
    with torch.no_grad():
        for name, ad in adapters.items():
            ad.lora_B.normal_(0, 0.1)
            lora = peft_model.get_submodule("base_model.model." + name)
            lora.lora_A["default"].weight.copy_(ad.lora_A)
            lora.lora_B["default"].weight.copy_(ad.lora_B)
    model.train()
    peft_model.train()
    batch = batches[1][0]
    out = model(**forward_batch(batch), labels=batch["labels"])
    ref = peft_model(**forward_batch(batch), labels=batch["labels"])
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    out.loss.backward()
    ref.loss.backward()
    for name, ad in adapters.items():
        lora = peft_model.get_submodule("base_model.model." + name)
        torch.testing.assert_close(ad.lora_A.grad, lora.lora_A["default"].weight.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(ad.lora_B.grad, lora.lora_B["default"].weight.grad, atol=1e-6, rtol=0)
    # and the initial A follows PEFT's distribution: Kaiming-uniform bound sqrt(6/((1+5) d_in)) = 1/sqrt(d_in)
    a = next(iter(adapters.values())).lora_A
    assert a.abs().max() <= a.shape[1] ** -0.5 and a.std() > 0.5 * a.shape[1] ** -0.5 / 3 ** 0.5


def test_orthogonal_init_is_exact_and_task_blocks_orthogonal():
    cfg = ThanoraConfig(rank=12, alpha=24, mode="orthogonal", min_rank=2)
    model, base, adapters, alloc, batches = setup(cfg)
    for task in batches:
        assert torch.equal(logits(model, task[0]), logits(base, task[0]))
    r_c = cfg.resolved_shared_rank(T)
    assert r_c == 3
    for (name, ad), ranks in zip(adapters.items(), alloc.ranks):
        assert sum(ranks) + r_c == 12 and min(ranks) >= 2
        assert ad.block_sizes == ranks + [r_c]
        starts = [0]
        for r in ranks:
            starts.append(starts[-1] + r)
        A = ad.lora_A.detach().double()
        for i in range(T):
            for j in range(i + 1, T):
                cross = A[starts[i]:starts[i + 1]] @ A[starts[j]:starts[j + 1]].T
                assert cross.abs().max() < 1e-5, (name, i, j)
        assert torch.count_nonzero(ad.lora_B) == 0
    # the tasks' statistics differ (vocabulary width grows with t): allocation is not uniform everywhere
    assert any(len(set(r)) > 1 for r in alloc.ranks)
    # q/k/v and gate/up share statistics but each layer decomposes its own W
    assert len(alloc.layers) == 2 * 7


def test_corda_init_keeps_base_function():
    cfg = ThanoraConfig(rank=8, alpha=16, mode="corda")
    model, base, adapters, _, batches = setup(cfg)
    for task in batches:
        torch.testing.assert_close(logits(model, task[0]), logits(base, task[0]), atol=1e-5, rtol=0)
    ad = next(iter(adapters.values()))
    assert ad.corda_A0 is not None and torch.count_nonzero(ad.lora_B[:, : sum(ad.task_sizes)]) > 0


def train_steps(model, adapters, batches, steps=3, lam=1e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        batch = batches[step % T][0]
        loss = model(**forward_batch(batch), labels=batch["labels"]).loss
        spr = spr_loss(adapters.values())
        if spr is not None:
            loss = loss + lam * spr
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("llava", [False, True], ids=["llama", "llava"])
@pytest.mark.parametrize("mode", ["orthogonal", "corda", "random"])
def test_merge_and_peft_export_reproduce_adapted_logits(tmp_path, mode, llava):
    cfg = ThanoraConfig(rank=8, alpha=16, mode=mode, dropout=0.1, train_projector=llava, spr_lambda=1e-2)
    model, base, adapters, _, batches = setup(cfg, llava=llava)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    train_steps(model, adapters, batches)
    probe = batches[2][1]
    adapted = logits(model, probe)
    assert not torch.allclose(adapted, logits(base, probe), atol=1e-4)  # training changed the function

    export_peft(model, tmp_path / "peft", str(base_dir))
    merged = merge_into_base(copy.deepcopy(model))
    merged.save_pretrained(tmp_path / "merged")
    cls = LlavaForConditionalGeneration if llava else AutoModelForCausalLM
    reloaded = cls.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, probe), adapted, atol=1e-5, rtol=0)
    # nothing extra: same module tree and parameter names as the base model
    assert [n for n, _ in reloaded.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert [type(m).__name__ for m in reloaded.modules()] == [type(m).__name__ for m in base.modules()]

    peft_model = PeftModel.from_pretrained(cls.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model, probe), adapted, atol=1e-5, rtol=0)

    if llava:
        # injection left the vision tower untouched; the projector was trained only because asked
        for n, p in model.named_parameters():
            if "vision_tower" in n:
                assert not p.requires_grad
                torch.testing.assert_close(p, base.get_parameter(n), atol=0, rtol=0)
        assert not any("vision_tower" in n for n in thanora_modules(model))
        proj = [n for n, p in model.named_parameters() if "multi_modal_projector" in n]
        assert proj and not any(torch.equal(model.get_parameter(n), base.get_parameter(n)) for n in proj)


def test_llava_injection_scope_and_untouched_projector():
    cfg = ThanoraConfig(rank=4, alpha=8, train_projector=False)
    model = tiny_llava()
    adapters = inject_thanora(model, cfg, 2)
    assert all(n.startswith("model.language_model.layers.") for n in adapters)
    assert len(adapters) == 14
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_allocation_json_roundtrip(tmp_path):
    cfg = ThanoraConfig(rank=8, alpha=16)
    model, _, adapters, alloc, _ = setup(cfg)
    alloc.save(tmp_path / "allocation.json")
    again = Allocation.load(tmp_path / "allocation.json")
    assert again == alloc
    assert alloc.token_counts and all(c > 0 for c in alloc.token_counts)
    from thanora_ds.initializer import plot_allocation
    plot_allocation(alloc, tmp_path / "allocation.png")
    assert (tmp_path / "allocation.png").stat().st_size > 1000


@pytest.mark.parametrize("kwargs,num_tasks,key", [
    (dict(rank=4), 5, "thanora.rank"),   # 5 tasks x min_rank 1 (+ shared 0) > 4
    (dict(rank=3, shared_rank=1), 3, "thanora.rank"),
    (dict(targets=["q_proj", "nope_proj"]), 2, "thanora.targets"),
    (dict(), 0, "no tasks"),
    (dict(spr_lambda=-1.0), 2, "thanora.spr_lambda"),
    (dict(tau=-0.5), 2, "thanora.tau"),
    (dict(mode="svd"), 2, "thanora.mode"),
    (dict(allocation="greedy"), 2, "thanora.allocation"),
])
def test_bad_configs_fail_before_any_work_naming_the_key(kwargs, num_tasks, key):
    model = tiny_llama()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        inject_thanora(model, ThanoraConfig(**kwargs), num_tasks)
    assert [n for n, _ in model.named_modules()] == before  # nothing was injected


def test_spr_under_activation_checkpointing_counted_once_with_correct_gradients(monkeypatch):
    import thanora_ds.adapter as adapter_module

    calls = []
    penalty = adapter_module.spr_layer_penalty
    monkeypatch.setattr(adapter_module, "spr_layer_penalty", lambda *a, **k: calls.append(1) or penalty(*a, **k))
    cfg = ThanoraConfig(rank=8, alpha=16, dropout=0.0, spr_lambda=0.5, spr_normalize=False)
    model, _, adapters, _, batches = setup(cfg)
    with torch.no_grad():
        for ad in adapters.values():
            ad.lora_B.normal_(0, 0.1)
            ad.lora_A.add_(0.05 * torch.randn_like(ad.lora_A))
    twin = copy.deepcopy(model)
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = batches[0][0]
    results = []
    for m in (model, twin):
        m.train()
        calls.clear()
        task_loss = m(**forward_batch(batch), labels=batch["labels"]).loss
        spr = spr_loss(thanora_modules(m).values())
        (task_loss + 0.5 * spr).backward()
        # once per layer and step: the checkpointed re-forward during backward does not compute it again
        assert len(calls) == len(adapters), (len(calls), len(adapters))
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        results.append((task_loss.item(), spr.item(), grads))
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6) and results[0][1] > 0
    for n, g in results[0][2].items():
        torch.testing.assert_close(results[1][2][n], g, atol=1e-6, rtol=1e-5)
    # the penalty's own gradient reaches A and B: without it the gradients differ
    model.zero_grad()
    model(**forward_batch(batch), labels=batch["labels"]).loss.backward()
    name = next(iter(results[0][2]))
    assert not torch.allclose(model.get_parameter(name).grad, results[0][2][name])


def test_hasi_memory_bounded_passes_give_the_same_result():
    """groups_per_pass=1 (one input group's statistics at a time, one preview pass per group) changes nothing."""
    cfg = ThanoraConfig(rank=8, alpha=16, mode="orthogonal")
    results = []
    for per_pass in (0, 1):
        model = tiny_llama()
        batches = synthetic_batches(T)
        adapters = inject_thanora(model, cfg, T)
        alloc = run_hasi(model, adapters, cfg, ["a", "b", "c"], lambda t: batches[t], 2, groups_per_pass=per_pass)
        results.append((alloc, {n: a.lora_A.detach().clone() for n, a in adapters.items()}))
    (a0, w0), (a1, w1) = results
    assert a0.ranks == a1.ranks and a0.token_counts == a1.token_counts
    for n in w0:
        torch.testing.assert_close(w0[n], w1[n], atol=1e-6, rtol=0)
    # 2 layers x (qkv, o, gate/up, down) = 8 statistics shared by 14 adapters
    from thanora_ds.initializer import _input_groups
    groups = _input_groups(model, adapters, batches[0][0])
    assert len(groups) == 8 and [len(g) for g in groups[:4]] == [3, 1, 2, 1]


def test_spr_keeps_activation_checkpointing_layer_by_layer():
    """The penalty's backward must not trigger every layer's recomputation at once (that would hold all
    layers' activations and undo checkpointing): recomputation and gradients still go layer by layer."""
    model = tiny_llama(layers=3)
    adapters = inject_thanora(model, ThanoraConfig(rank=8, spr_lambda=1.0), 3)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_B.normal_()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    events, phase = [], ["forward"]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a, i=i: events.append((phase[0], "run", i)))
        layer.mlp.down_proj.lora_B.register_hook(lambda g, i=i: events.append((phase[0], "grad", i)))
    batch = synthetic_batches(3)[0][0]
    loss = model(**forward_batch(batch), labels=batch["labels"]).loss + spr_loss(adapters.values())
    phase[0] = "backward"
    loss.backward()
    assert [e[1:] for e in events if e[0] == "backward"] == [
        ("run", 2), ("grad", 2), ("run", 1), ("grad", 1), ("run", 0), ("grad", 0)]
