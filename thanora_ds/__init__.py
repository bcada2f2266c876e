"""thanora_ds: ThanoRA multi-task LoRA for LLaMA / LLaVA on DeepSpeed ZeRO-3.

Entry points: ``launchers/train.py`` (training), ``launchers/merge.py`` and ``launchers/eval.py`` (after
training). The method's maths lives in ``hasi``, ``spr`` and ``adapter``; everything DeepSpeed-specific in
``distributed``.
"""

__version__ = "0.1.0"
