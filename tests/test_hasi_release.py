"""Issue 14: HASI must leave nothing behind that a plain LoRA run does not have.

Its preview forwards (no-grad, eval mode, outside the engine) made ZeRO-3 record a COMPLETE forward-only
parameter-fetch trace; the first training step invalidated it, the second re-recorded, and the slow first
prefetching step landed one step later than in plain LoRA (inside the measured steps). After the fix the first
training step records the trace, exactly as without HASI. And ZeRO-3's memoized release decisions from that trace
made every later step gather each weight twice (docs/performance.md section 3, "The remaining gap"). One process,
ZeRO-3, a tiny model, three launches (~45 s)."""
import textwrap

from run_fixtures import run_probe

GATHER_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC
    import thanora_ds.distributed as D
    from thanora_ds.train_config import load_train_config
    from thanora_ds.trainer import Trainer

    overrides, keep_cache = %s, %s
    seen = {{}}
    import thanora_ds.initializer as I
    reset, trimmed = I.reset_zero3_trace, I.trim_host_memory
    I.reset_zero3_trace = lambda engine: seen.setdefault("reset", reset(engine))
    I.trim_host_memory = lambda: seen.setdefault("trimmed", trimmed())
    if not keep_cache:            # DeepSpeed's behaviour without the fix: the memoized release decisions survive
        D.zero3_release_cache = lambda coordinator_class: None
    gathered = [0]
    original = PPC._PartitionedParameterCoordinator__all_gather_params
    def counting(self, params, forward):
        gathered[0] += len(params)
        return original(self, params, forward)
    PPC._PartitionedParameterCoordinator__all_gather_params = counting

    tr = Trainer(load_train_config({config!r}, ["train.max_steps=3", "train.report_to=[]", *overrides]))
    tr.setup()
    coord = tr.engine.optimizer.parameter_offload.get_param_coordinator()
    def mode():
        return "complete" if coord.is_complete_trace() else "record" if coord.is_record_trace() else "invalid"
    modes = [mode()]
    tr.engine.train()
    per_step = []
    for _ in range(3):
        gathered[0] = 0
        tr.train_step()
        per_step.append(gathered[0])
        modes.append(mode())
    print("RESULT", json.dumps({{"gathered": per_step, "modes": modes, **seen}}))
""")
PLAIN_LORA = ["thanora.mode=random", "thanora.allocation=uniform", "thanora.spr_lambda=0"]
STATISTICS_ONLY = ["thanora.mode=random", "thanora.allocation=scaled_softmax", "thanora.spr_lambda=0"]


def test_after_hasi_training_traces_and_gathers_as_plain_lora(tmp_path):
    """HASI's previews made ZeRO-3 memoize forward-only release decisions; without clearing them every training step
    re-gathered the weights for activation checkpointing's re-forward (issue 14's step gap). Plain LoRA's init and
    HASI's statistics-only init (same adapters, same batches) must all-gather the same parameters per step."""
    def gathers(name, overrides, keep_cache=True):
        (tmp_path / name).mkdir()
        return run_probe(tmp_path / name, GATHER_SCRIPT % (repr(overrides), keep_cache))

    lora = gathers("lora", PLAIN_LORA)
    after_hasi = gathers("hasi", STATISTICS_ONLY)
    stale = gathers("stale", STATISTICS_ONLY, keep_cache=False)["gathered"]
    assert after_hasi["reset"] is True       # HASI's previews had left a trace: the reset is not a no-op
    assert after_hasi["trimmed"] is True     # glibc: freed heap handed back
    # after setup nothing is traced; step 1 records (as in plain LoRA); from step 2 on ZeRO-3 prefetches by it
    assert after_hasi["modes"] == lora["modes"] == ["invalid", "record", "complete", "complete"], after_hasi
    lora, after_hasi = lora["gathered"], after_hasi["gathered"]
    assert after_hasi[1:] == lora[1:], (after_hasi, lora)     # step 1 records the trace: from step 2 on prefetching
    assert all(s > p for s, p in zip(stale[1:], lora[1:])), (stale, lora)   # the test can fail: the bug is visible
