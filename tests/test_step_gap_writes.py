"""Issue 14, item 2: HASI's ZeRO-safe writes (``distributed.write_param``) must leave DeepSpeed's ZeRO-3 state as a
plain LoRA run has it: every trainable partition still a view into the optimizer's flat low-precision buffers, every
fp32 master partition (what safe_set_full_fp32_param writes) still a view into the fp32 flat buffers that ZeRO-3's
optimizer step updates, and both holding the written values. (A written parameter turned into a separate tensor
would cost a copy per step and memory beside the flat buffers.) Passes as the code is: the write path was measured
and ruled out as a cause of the step gap (docs/performance.md section 3). One process, ZeRO-3, the tiny model,
~15 s."""
import textwrap

from run_fixtures import run_probe

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    import torch
    from thanora_ds.train_config import load_train_config
    from thanora_ds.trainer import Trainer

    tr = Trainer(load_train_config({config!r}, ["train.max_steps=1", "train.report_to=[]"]))
    tr.setup()
    opt = tr.engine.optimizer
    flat16 = opt.fp16_partitioned_groups_flat
    flat32 = opt.fp32_partitioned_groups_flat
    def inside(t, flats):
        ptr, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(f.data_ptr() <= ptr and end <= f.data_ptr() + f.numel() * f.element_size() for f in flats)
    views = [inside(p.ds_tensor, flat16) for p in tr.trainable]
    # the fp32 master partition that safe_set_full_fp32_param wrote (and that _optimizer_step steps) of every param
    same32 = all(inside(opt._get_fp32_opt_state_partition(p, False)[0], flat32) for p in tr.trainable)
    # the module's partitions (flat16) and the fp32 master agree: HASI's write reached both
    agree = max(float((a.float() - b[:a.numel()]).abs().max()) for a, b in zip(flat16, flat32))
    print("RESULT", json.dumps({{"views": views, "same32": same32,
                                 "agree": agree, "n": len(views)}}))
    tr.close()
""")


def test_hasi_writes_stay_in_deepspeeds_flat_buffers(tmp_path):
    result = run_probe(tmp_path, SCRIPT)
    assert result["n"] > 0 and all(result["views"]), result
    assert result["same32"], result
    assert result["agree"] == 0.0, result
