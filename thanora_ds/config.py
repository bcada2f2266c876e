"""The method's settings (the ``thanora:`` section of a run config), loaded by ``typed_config.from_dict``.

Every error names the offending key with its full dotted path (``thanora.rank``), and all checks run before
any model or data is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .hasi import ALLOCATIONS, DECOMPOSITIONS, GAMMA_RULES, SPECTRA
from .spr import SPR_TERMS
from .typed_config import ConfigError, apply_overrides, from_dict, read_config_file  # noqa: F401 (re-exported)

MODES = ("orthogonal", "corda", "random")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ThanoraConfig:
    """The method's settings (METHOD.md); defaults follow METHOD.md except where the benchmarks settled them
    (README, "Defaults and the runs behind them")."""

    rank: int = 16                      # r, total LoRA rank per target layer
    alpha: float = 32.0                 # s = alpha / r (rsLoRA: alpha / sqrt(r))
    rslora: bool = False
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    shared_rank: int | None = None      # r_c; None = floor(r / (T + 1)); 0 allowed
    mode: str = "orthogonal"            # orthogonal | corda | random
    allocation: str = "scaled_softmax"  # scaled_softmax | softmax | proportional | uniform
    tau: float = 3.0
    min_rank: int = 1
    gamma: float = 1.0                  # scale of HASI's A blocks (times the rule's per-task gain)
    gamma_rule: str = "match_lora"      # match_lora: plain LoRA's initial input scale (study); constant: unit rows
    spectrum: str = "weighted"          # weighted: W (C + delta I); covariance: C alone
    hasi_decomposition: str = "gram64"  # how K's spectrum is computed: gram64 | svd64 | gram32 | svd32 (hasi.py)
    exclude_system_turn: bool = True    # HASI statistics skip each record's own system turn (METHOD.md 2.2)
    statistics_cache: str = ""          # folder caching HASI's preview statistics across runs ("" = none)
    task_routing: bool = False          # training only: each sample updates only its task's block + the shared one
    spr_lambda: float = 1e-3
    spr_normalize: bool = True
    spr_terms: str = "both"             # both | A | B
    train_projector: bool = False       # LLaVA: train the multimodal projector fully
    init_seed: int = 0                  # seed of the random (shared-block / mode=random) initializations

    def resolved_shared_rank(self, num_tasks: int) -> int:
        return self.rank // (num_tasks + 1) if self.shared_rank is None else self.shared_rank

    def check_values(self, prefix: str = "thanora") -> None:
        self.validate(prefix=prefix or "thanora")

    def validate(self, num_tasks: int | None = None, prefix: str = "thanora") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}: {msg}")

        if self.rank < 1:
            raise bad("rank", f"must be >= 1, got {self.rank}")
        for key, options in (("mode", MODES), ("allocation", ALLOCATIONS), ("spectrum", SPECTRA),
                             ("spr_terms", SPR_TERMS), ("gamma_rule", GAMMA_RULES),
                             ("hasi_decomposition", DECOMPOSITIONS)):
            if getattr(self, key) not in options:
                raise bad(key, f"unknown value {getattr(self, key)!r}; choose one of {list(options)}")
        for key in ("spr_lambda", "tau", "alpha"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not self.gamma > 0:
            raise bad("gamma", f"must be > 0 (it scales the initial A blocks), got {self.gamma}")
        if self.tau == 0 and self.allocation in ("scaled_softmax", "softmax"):
            raise bad("tau", "must be > 0 for softmax allocations")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.min_rank < 0:
            raise bad("min_rank", f"must be >= 0, got {self.min_rank}")
        if self.shared_rank is not None and self.shared_rank < 0:
            raise bad("shared_rank", f"must be >= 0, got {self.shared_rank}")
        if not self.targets:
            raise bad("targets", "is empty: name at least one linear layer (e.g. q_proj)")
        if num_tasks is not None:
            if num_tasks < 1:
                raise ConfigError("no tasks: the data defines no task (data.sources / data.tasks)")
            r_c = self.resolved_shared_rank(num_tasks)
            need = num_tasks * self.min_rank + r_c
            if need > self.rank:
                raise bad("rank", f"r={self.rank} is too small for {num_tasks} tasks at min_rank={self.min_rank} "
                                  f"plus a shared block of {r_c}: need r >= {need}")

    def check_rank_fits(self, shapes: dict[str, tuple[int, ...]], num_tasks: int,
                        never_adapted: Sequence[str] = ()) -> None:
        """Before the model loads (``shapes`` from the weight files' headers): in modes orthogonal and corda the
        task rows of a layer are orthonormal directions of its input space and singular vectors of its weight,
        so r - r_c of them must fit into min(d_out, d_in) of every adapted layer. Mode random has no such bound."""
        if self.mode == "random":
            return
        need = self.rank - self.resolved_shared_rank(num_tasks)
        adapted = {name: shape for name, shape in shapes.items() if len(shape) == 2 and name.endswith(".weight")
                   and name.split(".")[-2] in self.targets
                   and not any(skip in name for skip in never_adapted)}
        if not adapted:
            return
        name, shape = min(adapted.items(), key=lambda item: min(item[1]))
        if need > min(shape):
            raise ConfigError(
                f"thanora.rank: r={self.rank} leaves {need} task rows per layer, more than {name} of shape "
                f"{list(shape)} has directions (min(d_out, d_in) = {min(shape)}) for mode {self.mode}; lower "
                f"thanora.rank to <= {min(shape) + self.resolved_shared_rank(num_tasks)}, raise "
                "thanora.shared_rank, or drop that target")
