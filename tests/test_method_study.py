"""Issue 15's method pieces: the gamma rule (match plain LoRA's initial scale), the record's own system turn left
out of HASI's statistics, the statistics cache, and the mechanism metrics."""
import copy
import math

import pytest
import torch

from thanora_ds.config import ThanoraConfig
from thanora_ds.hasi import (Spectrum, common_prefix_length, lora_matched_gains, orthogonal_task_rows,
                             projected_covariances)
from thanora_ds.initializer import run_hasi
from thanora_ds.inject import inject_thanora
from thanora_ds.mechanism import effective_rank, layer_metrics, singular_values_of_product, subspace_overlap
from thanora_ds.statistics_cache import StatisticsCache, statistics_key
from tiny_assets import SYSTEM_PROMPT
from tiny_models import synthetic_batches, tiny_llama

T = 3


def _hasi(cfg, batches, cache=None, seed=0):
    model = tiny_llama(seed)
    adapters = inject_thanora(model, cfg, T)
    prefix = common_prefix_length([row.tolist() for task in batches for b in task for row in b["input_ids"]])
    alloc = run_hasi(model, adapters, cfg, [f"t{t}" for t in range(T)], lambda t: batches[t], prefix, cache=cache)
    return model, adapters, alloc, prefix


def _input_energy(model, adapters, batches, prefix):
    """Measured E ||A_t x||^2 / r_t per (layer, task) over each task's content tokens, and E ||x||^2 / d_in."""
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args[0])) for n, a in adapters.items()]
    per = {n: [] for n in adapters}
    with torch.no_grad():
        for t, task in enumerate(batches):
            acc = {n: [0.0, 0.0, 0] for n in adapters}
            for b in task:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                mask = b["attention_mask"].bool().clone()
                mask[:, :prefix] = False
                for n, a in adapters.items():
                    x = seen[n][mask].double()
                    r_t, start = a.task_sizes[t], sum(a.task_sizes[:t])
                    rows = a.lora_A[start:start + r_t].double()
                    acc[n][0] += float((x @ rows.T).pow(2).sum()) / max(r_t, 1)
                    acc[n][1] += float(x.pow(2).sum()) / a.in_features
                    acc[n][2] += x.shape[0]
            for n in adapters:
                per[n].append((acc[n][0] / acc[n][2], acc[n][1] / acc[n][2]))
    for h in hooks:
        h.remove()
    return per


def test_lora_matched_gain_is_exact_for_jointly_orthogonalized_rows():
    torch.manual_seed(0)
    d, ranks = 12, [3, 2]
    xs = [torch.randn(300, d, dtype=torch.float64) * torch.linspace(3, 0.1, d, dtype=torch.float64).roll(4 * t)
          for t in range(2)]
    covs = [x.T @ x / x.shape[0] for x in xs]
    spectra = []
    for cov in covs:
        evals, evecs = torch.linalg.eigh(cov)
        spectra.append(Spectrum(sigma=evals.flip(0), vh=evecs.flip(1).T[:6].clone()))
    coefficients = []
    rows = orthogonal_task_rows(spectra, ranks, coefficients=coefficients)
    gains = lora_matched_gains(coefficients, *projected_covariances(spectra, covs), d)
    for t, (block, x, cov) in enumerate(zip(torch.split(rows, ranks), xs, covs)):
        assert torch.allclose(coefficients[t] @ torch.cat([s.vh for s in spectra]), block, atol=1e-12)
        energy = float((x @ (gains[t] * block).T).pow(2).sum(1).mean())
        assert energy == pytest.approx(ranks[t] * float(cov.trace()) / (3 * d), rel=1e-9)
        assert gains[t] < 1   # unit rows along the top directions carry far more than LoRA's random rows
    # Kaiming-uniform(a=sqrt(5)) rows, as inject.py draws them, have that expectation
    kaiming = torch.empty(4000, d, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(kaiming, a=math.sqrt(5))
    energy = float((xs[0] @ kaiming.T).pow(2).sum(1).mean()) / 4000
    assert energy == pytest.approx(float(covs[0].trace()) / (3 * d), rel=0.05)


def test_gamma_rule_match_lora_gives_plain_loras_initial_input_scale_on_a_model():
    batches = synthetic_batches(T)
    cfg = ThanoraConfig(rank=8, alpha=16, dropout=0.0, spr_lambda=0.0, gamma_rule="match_lora")
    model, adapters, _, prefix = _hasi(cfg, batches)
    unit = ThanoraConfig(rank=8, alpha=16, dropout=0.0, spr_lambda=0.0, gamma_rule="constant")
    model_u, adapters_u, _, _ = _hasi(unit, batches)
    matched = _input_energy(model, adapters, batches, prefix)
    plain = _input_energy(model_u, adapters_u, batches, prefix)
    ratios, unit_ratios = [], []
    for n in adapters:
        for t in range(T):
            energy, lora_expectation = matched[n][t][0], matched[n][t][1] / 3.0   # E||a x||^2 of a Kaiming row
            ratios.append(energy / lora_expectation)
            unit_ratios.append(plain[n][t][0] / lora_expectation)
    # measured on the model's own forward (fp32 activations): equal up to float rounding
    assert min(ratios) > 0.999 and max(ratios) < 1.001, (min(ratios), max(ratios))
    assert min(unit_ratios) > 2, "the unit-row init was expected to carry several times LoRA's input energy"
    # rows of different tasks stay orthogonal after the per-task gains
    for a in adapters.values():
        s = a.task_sizes
        blocks = torch.split(a.lora_A[:sum(s)].double(), s)
        for i in range(T):
            for j in range(i + 1, T):
                assert float((blocks[i] @ blocks[j].T).abs().max().detach()) < 1e-6


def test_statistics_cache_skips_every_preview_forward_and_reproduces_the_blocks(tmp_path, caplog, monkeypatch):
    batches = synthetic_batches(T)
    cfg = ThanoraConfig(rank=8, alpha=16, dropout=0.0)
    key = statistics_key({"model": "tiny", "prefix": 2}, [[{"input_ids": r.tolist()} for b in task for r in b["input_ids"]]
                                                           for task in batches])
    _, first, alloc1, _ = _hasi(cfg, batches, StatisticsCache(tmp_path, key))
    assert (tmp_path / key / "complete.json").is_file()
    import thanora_ds.initializer as initializer
    forwards = []
    real = initializer._preview_forward
    monkeypatch.setattr(initializer, "_preview_forward", lambda m, b: (forwards.append(1), real(m, b)))
    _, second, alloc2, _ = _hasi(cfg, batches, StatisticsCache(tmp_path, key))
    assert len(forwards) == 1   # only the forward that finds the input groups; the first run made 1 + 6
    assert alloc2.ranks == alloc1.ranks and alloc2.entropy == alloc1.entropy
    assert alloc2.token_counts == alloc1.token_counts
    for n in first:
        assert torch.equal(first[n].lora_A, second[n].lora_A)
    # a damaged entry is detected, not used, and rewritten
    victim = next((tmp_path / key).glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        _, third, alloc3, _ = _hasi(cfg, batches, StatisticsCache(tmp_path, key))
    assert "damaged" in caplog.text
    assert alloc3.entropy == alloc1.entropy
    assert StatisticsCache(tmp_path, key)._usable_here({}, T)


def test_statistics_key_depends_on_previews_and_settings():
    a = [[{"input_ids": [1, 2, 3], "content_start": 0}]]
    b = [[{"input_ids": [1, 2, 4], "content_start": 0}]]
    c = [[{"input_ids": [1, 2, 3], "content_start": 2}]]
    keys = {statistics_key({"p": 1}, a), statistics_key({"p": 1}, b), statistics_key({"p": 1}, c),
            statistics_key({"p": 2}, a)}
    assert len(keys) == 4
    assert statistics_key({"p": 1}, a) == statistics_key({"p": 1}, copy.deepcopy(a))


def test_system_turn_is_not_content(tmp_path):
    """The record's own system turn: its tokens are measured by the encoder and left out of the statistics."""
    from thanora_ds.data.encode import Encoder
    from thanora_ds.data.records import Record
    from tiny_assets import make_llama_tokenizer

    tok = make_llama_tokenizer(tmp_path / "tok")
    enc = Encoder(tok, max_length=128)
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of grass?"},
            {"role": "assistant", "content": "Green."}]
    e = enc.encode(Record(id="a", task="t", messages=msgs, source="s"))
    system_ids = tok(tok.apply_chat_template(msgs[:1], tokenize=False), add_special_tokens=False)["input_ids"]
    assert e.content_start == len(system_ids) > 3
    assert e.input_ids[:e.content_start] == system_ids
    # no system turn: the block the template adds by itself (its default system prompt) is left out the same way,
    # so a task without a system prompt is not measured on the template's words either
    plain = enc.encode(Record(id="b", task="t", messages=msgs[1:], source="s"))
    assert enc.default_system_text() == "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    default_ids = tok(enc.default_system_text(), add_special_tokens=False)["input_ids"]
    assert plain.content_start == len(default_ids) > 3 and plain.input_ids[:plain.content_start] == default_ids

    batches = synthetic_batches(T)
    for task in batches:
        for b in task:
            b["content_start"] = torch.full((b["input_ids"].shape[0],), 5)
    counted = {}
    for exclude in (True, False):
        cfg = ThanoraConfig(rank=8, alpha=16, dropout=0.0, exclude_system_turn=exclude)
        _, _, alloc, prefix = _hasi(cfg, batches)
        counted[exclude] = alloc.token_counts
    assert prefix == 2
    rows = [sum(b["input_ids"].shape[0] for b in task) for task in batches]
    assert [a - b for a, b in zip(counted[False], counted[True])] == [(5 - 2) * n for n in rows]


def test_system_turn_folded_into_the_user_turn_stays_content(tmp_path):
    """Templates without a separate system block (Llama-2 style) give content_start 0."""
    from thanora_ds.data.encode import Encoder
    from thanora_ds.data.records import Record
    from tiny_assets import make_llama_tokenizer

    tok = make_llama_tokenizer(tmp_path / "tok")
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}{% if loop.first %}{{ raise_exception('x') if msgs|length == 0 }}"
        "{% endif %}[INST] {% if loop.first and sys %}<<SYS>>{{ sys }}<</SYS>> {% endif %}{{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")
    enc = Encoder(tok, max_length=128)
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of grass?"},
            {"role": "assistant", "content": "Green."}]
    assert enc.encode(Record(id="a", task="t", messages=msgs, source="s")).content_start == 0
    assert enc.encode(Record(id="b", task="t", messages=msgs[1:], source="s")).content_start == 0


@pytest.mark.parametrize("template,default", [
    # Llama-3 style: BOS, then a default system header with a date when the record has none
    ("{{ '<s>' }}{% if messages[0]['role'] != 'system' %}<|sys|>Cutting Knowledge Date: 2023<|eot|>{% endif %}"
     "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}",
     "<s><|sys|>Cutting Knowledge Date: 2023<|eot|>"),
    # ChatML without a default system prompt, and llava-hf's USER:/ASSISTANT: template: nothing to leave out
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}", ""),
    ("{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
     "{{ m['content'] + ' ' }}{% endfor %}", ""),
], ids=["llama3_like", "chatml_plain", "llava_hf_like"])
def test_default_system_block_of_other_templates(tmp_path, template, default):
    from thanora_ds.data.encode import Encoder
    from thanora_ds.data.records import Record
    from tiny_assets import make_llama_tokenizer

    tok = make_llama_tokenizer(tmp_path / "tok")
    tok.chat_template = template
    enc = Encoder(tok, max_length=128)
    assert enc.default_system_text() == default
    if ".upper()" in template:   # this tiny tokenizer merges across llava-hf's turn boundaries: no record to encode
        return
    e = enc.encode(Record(id="b", task="t", messages=[{"role": "user", "content": "Colour of grass?"},
                                                      {"role": "assistant", "content": "Green."}], source="s"))
    assert e.content_start == len(tok(default, add_special_tokens=False)["input_ids"] if default else [])


def test_mechanism_metrics_on_known_factors():
    torch.manual_seed(0)
    d_in, d_out = 10, 8
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))
    a = q[:4].clone()                           # two tasks of 2 orthogonal rows, shared block of 0
    b = torch.randn(d_out, 4, dtype=torch.float64)
    m = layer_metrics(a, b, [2, 2, 0], scale=2.0)
    assert m["row_overlap"] == pytest.approx(0.0, abs=1e-12)
    assert m["update_overlap"] == pytest.approx(0.0, abs=1e-12)   # orthogonal input rows: orthogonal updates
    assert sum(m["task_share"]) == pytest.approx(1.0)
    same = layer_metrics(torch.cat([a[:2], a[:2]]), torch.cat([b[:, :2], b[:, :2]], 1), [2, 2, 0], 1.0)
    assert same["row_overlap"] == pytest.approx(1.0) and same["col_overlap"] == pytest.approx(1.0)
    assert same["update_overlap"] == pytest.approx(1.0)
    assert same["task_share"] == pytest.approx([0.5, 0.5])
    # singular values of B A from the small core equal those of the product
    assert torch.allclose(singular_values_of_product(b, a), torch.linalg.svdvals(b @ a)[:4], atol=1e-10)
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    # the input-weighted share follows the covariance: inputs only along task 0's rows give it all the energy
    cov = a[:2].T @ a[:2]
    assert layer_metrics(a, b, [2, 2, 0], 1.0, cov)["task_share"] == pytest.approx([1.0, 0.0], abs=1e-12)
    assert subspace_overlap(a[:2], torch.zeros(2, d_in, dtype=torch.float64)) == 0.0


def test_task_routing_sends_each_sample_through_its_own_block_and_the_shared_one():
    from thanora_ds.adapter import ThanoraLinear

    torch.manual_seed(0)
    layer = ThanoraLinear(torch.nn.Linear(6, 5), rank=6, alpha=6.0, block_sizes=[2, 2, 2])
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 6)
    layer.route = torch.tensor([0, 1])
    routed = layer(x)
    routed.sum().backward()
    for b, keep in ((0, [0, 1, 4, 5]), (1, [2, 3, 4, 5])):   # own block + shared block
        manual = layer.base(x[b]) + layer.scale * (x[b] @ layer.lora_A[keep].T) @ layer.lora_B[:, keep].T
        assert torch.allclose(routed[b], manual, atol=1e-6)
    # with every sample of task 0, task 1's block gets no gradient
    layer.zero_grad()
    layer.route = torch.tensor([0, 0])
    layer(x).sum().backward()
    assert float(layer.lora_A.grad[2:4].abs().max()) == 0.0 and float(layer.lora_B.grad[:, 2:4].abs().max()) == 0.0
    assert float(layer.lora_A.grad[0:2].abs().max()) > 0
    layer.route = None   # evaluation: every block, the merged model's function
    assert torch.allclose(layer(x), layer.base(x) + layer.scale * (x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-6)


def test_training_with_task_routing_and_the_statistics_cache(tmp_path):
    """Through the trainer: task routing trains; a second run with the same data and the cache previews nothing."""
    import json

    from run_fixtures import launch, make_run, read_metrics

    config = make_run(tmp_path, train__max_steps=2)
    cache = tmp_path / "cache"
    first = launch(config, 0, "thanora.task_routing=true", f"thanora.statistics_cache={cache}")
    assert "preview pass" in first.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]
    assert len(list(cache.glob("*/complete.json"))) == 1
    second = launch(config, 0, f"thanora.statistics_cache={cache}", f"train.output_dir={tmp_path / 'out2'}")
    assert "cached statistics" in second.stderr and "preview pass" not in second.stderr
    a, b = (json.loads((tmp_path / d / "allocation.json").read_text()) for d in ("out", "out2"))
    assert a["ranks"] == b["ranks"] and a["entropy"] == b["entropy"] and a["token_counts"] == b["token_counts"]
