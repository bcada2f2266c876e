"""Issue 14: HASI must leave nothing behind that a plain LoRA run does not have.

Its preview forwards (no-grad, eval mode, outside the engine) made ZeRO-3 record a COMPLETE forward-only
parameter-fetch trace; the first training step invalidated it, the second re-recorded, and the slow first
prefetching step landed one step later than in plain LoRA (inside the measured steps). After the fix the first
training step records the trace, exactly as without HASI. One process, ZeRO-3, a tiny model (~20 s)."""
import textwrap

from run_fixtures import run_probe

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import thanora_ds.initializer as I
    from thanora_ds.train_config import load_train_config
    from thanora_ds.trainer import Trainer

    seen = {{}}
    reset = I.reset_zero3_trace
    def spy(engine):
        seen["reset"] = reset(engine)
        return seen["reset"]
    I.reset_zero3_trace = spy
    trimmed = I.trim_host_memory
    def spy_trim():
        seen["trimmed"] = trimmed()
        return seen["trimmed"]
    I.trim_host_memory = spy_trim

    tr = Trainer(load_train_config({config!r}, ["train.max_steps=2", "train.report_to=[]"]))
    tr.setup()
    coord = tr.engine.optimizer.parameter_offload.get_param_coordinator()
    def mode():
        return "complete" if coord.is_complete_trace() else "record" if coord.is_record_trace() else "invalid"
    modes = [mode()]
    tr.engine.train()
    for _ in range(2):
        tr.train_step()
        modes.append(mode())
    print("RESULT", json.dumps({{"modes": modes, **seen}}))
""")


def test_first_training_step_records_the_zero3_trace_after_hasi(tmp_path):
    result = run_probe(tmp_path, SCRIPT)
    assert result["reset"] is True           # HASI's previews had left a trace: the reset is not a no-op
    assert result["trimmed"] is True         # glibc: freed heap handed back
    # after setup nothing is traced; step 1 records (as in plain LoRA); from step 2 on ZeRO-3 prefetches by it
    assert result["modes"] == ["invalid", "record", "complete"], result["modes"]
