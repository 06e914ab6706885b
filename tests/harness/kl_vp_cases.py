"""The case table of tests/kl/test_kl_vocab_parallel.py (vocabulary-parallel / DTensor KL family):
one ``KC`` per case, the spawned worker (kl_vocab_parallel_worker.py) runs them per world size."""
from __future__ import annotations

import dataclasses

import torch

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
ROWS = (2, 3)
R = 6


@dataclasses.dataclass
class KC:
    """One case: C = sum(sizes) classes split over the ranks in rank order."""
    id: str
    world: int
    sizes: list
    fn: str = "logprobs"  # or "distill"
    opts: dict = dataclasses.field(default_factory=dict)
    dtype: torch.dtype = F32
    labels: bool = False  # distill: labels (a third of them ignore_index)
    torch_path: bool = False  # TRITON_INTERPRET=0 in the worker
    rank_opts: dict = dataclasses.field(default_factory=dict)  # rank -> options overriding opts
    teacher_trim: dict = dataclasses.field(default_factory=dict)  # rank -> columns cut off its teacher
    error: bool = False  # every rank must raise ValueError
    module: bool = False  # through the module form (TokenLogprobs, DistillationLoss, Linear...)
    dtensor: bool = False  # logits (and teacher) as DTensors Shard(-1): sizes = the torch.chunk layout
    mesh: tuple = ()  # the linear forms on a mesh of this shape: hidden / head placements h_pl / w_pl
    h_pl: tuple = ()  # per mesh dim: "S" (Shard(0): tokens, or classes for the head), "C" (Shard(-1):
    # the logits' classes) or "R"
    w_pl: tuple = ()


LP = "logprobs"
D, DT = 5, 4  # hidden sizes of the linear forms (student, teacher)
CASES = [
    KC("lp-w2-even-ent", 2, [7, 7], opts=dict(temperature=0.7, return_entropy=True)),
    KC("lp-w2-uneven", 2, [4, 9]),
    KC("lp-w2-empty-ent-bf16", 2, [0, 13], opts=dict(temperature=2.0, return_entropy=True), dtype=BF16),
    KC("lp-w2-uneven-ent-torch", 2, [5, 8], opts=dict(temperature=1.3, return_entropy=True), torch_path=True),
    KC("lp-w4-even-ent", 4, [4, 4, 4, 4], opts=dict(temperature=0.5, return_entropy=True)),
    KC("lp-w4-empty-ent-torch", 4, [5, 0, 4, 4], opts=dict(return_entropy=True), torch_path=True),
    KC("kl-w2-even-ce", 2, [7, 7], "distill", dict(divergence="kl", ce_weight=0.3), labels=True),
    KC("rkl-w2-empty-bf16", 2, [0, 13], "distill", dict(divergence="reverse_kl", temperature=2.0,
                                                         reduction="sum"), dtype=BF16),
    KC("jsd-w2-uneven-none", 2, [4, 9], "distill", dict(divergence="jsd", beta=0.3, temperature=0.5,
                                                         reduction="none"), labels=True, torch_path=True),
    KC("kl-w4-empty-sum-ce", 4, [5, 0, 4, 4], "distill", dict(divergence="kl", reduction="sum",
                                                               ce_weight=0.5, temperature=2.0), labels=True),
    KC("rkl-w4-even-mean", 4, [4, 4, 4, 4], "distill", dict(divergence="reverse_kl"), labels=True),
    KC("jsd-w4-uneven-ce", 4, [3, 5, 0, 5], "distill", dict(divergence="jsd", beta=0.7, ce_weight=0.2,
                                                             reduction="none"), labels=True),
    KC("llp-w2-uneven-ent", 2, [4, 9], "linear_logprobs", dict(temperature=0.7, return_entropy=True,
                                                                chunk_size=4)),
    KC("llp-w4-empty-torch", 4, [5, 0, 4, 4], "linear_logprobs", dict(temperature=1.5), torch_path=True),
    KC("ljsd-w2-empty-ce", 2, [0, 13], "linear_distill", dict(divergence="jsd", ce_weight=0.4, chunk_size=4),
       labels=True),
    KC("lkl-w4-uneven-none", 4, [3, 5, 0, 5], "linear_distill", dict(divergence="kl", temperature=2.0,
                                                                      chunk_size=5,
                                                                      reduction="none"), labels=True),
    KC("lrkl-w4-even-bf16", 4, [4, 4, 4, 4], "linear_distill", dict(divergence="reverse_kl"), dtype=BF16),
    KC("dt-lp-w2-ent", 2, [7, 6], opts=dict(temperature=0.8, return_entropy=True), dtensor=True),
    KC("dt-lp-w4-empty", 4, [2, 2, 1, 0], opts=dict(return_entropy=True), dtensor=True),
    KC("dt-jsd-w2-mean-ce", 2, [7, 6], "distill", dict(divergence="jsd", ce_weight=0.3), labels=True,
       dtensor=True),
    KC("dt-kl-w4-empty-none", 4, [4, 4, 4, 1], "distill", dict(reduction="none", temperature=0.5),
       labels=True, dtensor=True),
    KC("mod-lp-w2-ent", 2, [5, 8], opts=dict(temperature=0.9, return_entropy=True), module=True),
    KC("mod-jsd-w4-ce", 4, [3, 5, 0, 5], "distill", dict(divergence="jsd", ce_weight=0.2), labels=True,
       module=True),
    KC("mod-llp-w4-ent", 4, [4, 4, 4, 4], "linear_logprobs", dict(return_entropy=True), module=True),
    KC("mod-lrkl-w2-sum", 2, [7, 7], "linear_distill", dict(divergence="reverse_kl", reduction="sum"),
       labels=True, module=True),
    # the linear forms on DTensors: hidden Replicate, heads Shard(0) (sizes = the torch.chunk layout)
    KC("dt-llp-w2-ent", 2, [7, 6], "linear_logprobs", dict(temperature=0.7, return_entropy=True),
       dtensor=True),
    KC("dt-llp-w4-even-bf16", 4, [4, 4, 4, 4], "linear_logprobs", dict(temperature=1.5), dtype=BF16,
       dtensor=True),
    KC("dt-llp-w4-empty-ent-torch", 4, [2, 2, 1, 0], "linear_logprobs", dict(return_entropy=True),
       torch_path=True, dtensor=True),
    KC("dt-lkl-w2-mean-ce", 2, [7, 6], "linear_distill", dict(divergence="kl", ce_weight=0.3, chunk_size=4,
                                                               temperature=2.0), labels=True, dtensor=True),
    KC("dt-ljsd-w4-empty-none", 4, [2, 2, 1, 0], "linear_distill", dict(divergence="jsd", beta=0.3,
                                                                       chunk_size=2,
                                                                       reduction="none"), labels=True,
       dtensor=True),
    KC("dt-lrkl-w4-uneven-sum-bf16", 4, [4, 4, 4, 1], "linear_distill", dict(divergence="reverse_kl",
                                                                             reduction="sum"), dtype=BF16,
       dtensor=True),
    KC("dt-ljsd-w2-torch", 2, [7, 6], "linear_distill", dict(divergence="jsd", ce_weight=0.5), labels=True,
       torch_path=True, dtensor=True),
    # errors: one rank differs; every rank must raise (ValueError), none may hang
    KC("err-w2-lp-temperature", 2, [4, 9], rank_opts={1: dict(temperature=2.0)}, error=True),
    KC("err-w2-lp-bad-temperature", 2, [4, 9], rank_opts={0: dict(temperature=-1.0)}, error=True),
    KC("err-w2-distill-layout", 2, [7, 7], "distill", teacher_trim={1: 1}, error=True),
    KC("err-w2-distill-divergence", 2, [7, 7], "distill", rank_opts={0: dict(divergence="jsd")}, error=True),
    KC("err-w4-distill-layout", 4, [4, 4, 4, 4], "distill", teacher_trim={2: 1}, error=True),
    KC("err-w2-linear-layout", 2, [7, 7], "linear_distill", teacher_trim={0: 1}, error=True),
    KC("err-w4-llp-temperature", 4, [4, 4, 4, 4], "linear_logprobs", rank_opts={2: dict(temperature=0.5)},
       error=True),
    KC("err-w4-lp-entropy", 4, [5, 0, 4, 4], rank_opts={3: dict(return_entropy=True)}, error=True),
    # softcap / token_weight are agreed on: one rank passing another (or none), or a bad weight, raises
    KC("err-w2-lp-softcap-one", 2, [4, 9], rank_opts={1: dict(softcap=5.0)}, error=True),
    KC("err-w2-distill-softcap-differs", 2, [7, 7], "distill", dict(softcap=5.0),
       rank_opts={1: dict(softcap=6.0)}, error=True),
    KC("err-w4-ldistill-tw-one", 4, [4, 4, 4, 4], "linear_distill",
       rank_opts={0: dict(token_weight=torch.ones(2, 3))}, error=True),
    KC("err-w2-llp-softcap-one", 2, [7, 7], "linear_logprobs", rank_opts={0: dict(softcap=5.0)}, error=True),
    KC("err-w2-dt-lp-softcap-one", 2, [7, 6], rank_opts={1: dict(softcap=5.0)}, dtensor=True, error=True),
    KC("err-w2-lp-tw-shape-one", 2, [4, 9], opts=dict(token_weight=torch.ones(2, 3)),
       rank_opts={1: dict(token_weight=torch.ones(3, 2))}, error=True),
    KC("err-dt-w2-llp-temperature", 2, [7, 6], "linear_logprobs", rank_opts={1: dict(temperature=2.0)},
       error=True, dtensor=True),
    KC("err-dt-w4-ld-teacher-layout", 4, [4, 4, 4, 1], "linear_distill", teacher_trim={2: 1}, error=True,
       dtensor=True),  # DTensor: that rank's teacher head is Replicate, the others' Shard(0)
    KC("err-dt-w4-ld-divergence", 4, [2, 2, 1, 0], "linear_distill", rank_opts={0: dict(divergence="jsd")},
       error=True, dtensor=True),
    KC("err-llp-acc", 2, [7, 7], "linear_logprobs", rank_opts={1: dict(grad_accum_dtype=BF16)}, error=True),
]
# DTensor meshes with token-sharded dims: checked on the full tensors
# softcap (each shard caps its own logits, before the temperature) and token_weight (on the per-row
# results) under process_group and DTensor, world 2, uneven shards; TW: random positive weights
TW = torch.rand(2, 3, generator=torch.Generator().manual_seed(7)) + 0.25
CAP = dict(softcap=4.0, token_weight=TW)
CASES += [
    KC("cap-lp-w2-uneven-ent", 2, [4, 9], opts=dict(CAP, temperature=0.7, return_entropy=True)),
    KC("cap-lp-w2-uneven-torch", 2, [5, 8], opts=dict(CAP, temperature=1.3), torch_path=True),
    KC("cap-kl-w2-uneven-ce", 2, [4, 9], "distill", dict(CAP, divergence="kl", ce_weight=0.3,
                                                          temperature=2.0), labels=True),
    KC("cap-rkl-w2-empty-none", 2, [0, 13], "distill", dict(CAP, divergence="reverse_kl", reduction="none"),
       labels=True),
    KC("cap-jsd-w2-uneven-ce-torch", 2, [5, 8], "distill", dict(CAP, divergence="jsd", ce_weight=0.4,
                                                                 temperature=0.5), labels=True,
       torch_path=True),
    KC("cap-llp-w2-uneven-ent", 2, [4, 9], "linear_logprobs", dict(CAP, return_entropy=True, chunk_size=4)),
    KC("cap-ljsd-w2-uneven-ce", 2, [4, 9], "linear_distill", dict(CAP, divergence="jsd", ce_weight=0.3,
                                                                   chunk_size=4), labels=True),
    KC("dt-cap-lp-w2-ent", 2, [7, 6], opts=dict(CAP, temperature=0.8, return_entropy=True), dtensor=True),
    KC("dt-cap-kl-w2-ce-sum", 2, [7, 6], "distill", dict(CAP, ce_weight=0.3, reduction="sum"), labels=True,
       dtensor=True),
    KC("dt-cap-llp-w2-torch", 2, [7, 6], "linear_logprobs", dict(CAP, temperature=0.7), torch_path=True,
       dtensor=True),
    KC("dt-cap-lrkl-w2-ce", 2, [7, 6], "linear_distill", dict(CAP, divergence="reverse_kl", ce_weight=0.3,
                                                               chunk_size=4), labels=True, dtensor=True),
]
MESH_CASES = [
    KC("mesh-lp-w4-dp2-tp2-ent", 4, [7, 6], opts=dict(temperature=0.7, return_entropy=True), mesh=(2, 2),
       h_pl=("S", "C")),
    KC("mesh-jsd-w4-tp2-dp2-ce", 4, [7, 6], "distill", dict(divergence="jsd", ce_weight=0.2), labels=True,
       mesh=(2, 2), h_pl=("C", "S")),
    KC("mesh-kl-w4-dp2-tp2-none", 4, [7, 6], "distill", dict(reduction="none", temperature=2.0),
       labels=True, mesh=(2, 2), h_pl=("S", "C")),
    KC("mesh-llp-w2-dp-only", 2, [13], "linear_logprobs", dict(temperature=0.8, return_entropy=True),
       mesh=(2,), h_pl=("S",), w_pl=("R",)),  # no TP dim: the single-device op on the local tokens
    KC("mesh-lkl-w4-dp2-tp2-ce", 4, [7, 6], "linear_distill", dict(divergence="kl", ce_weight=0.3,
                                                                  temperature=2.0, chunk_size=2),
       labels=True, mesh=(2, 2), h_pl=("S", "R"), w_pl=("R", "S")),
    KC("mesh-ljsd-w4-dp2-tp2-none", 4, [7, 6], "linear_distill", dict(divergence="jsd", reduction="none"),
       labels=True, mesh=(2, 2), h_pl=("S", "R"), w_pl=("R", "S")),
    KC("mesh-llp-w4-tp2-dp2", 4, [7, 6], "linear_logprobs", dict(return_entropy=True),
       mesh=(2, 2), h_pl=("R", "S"), w_pl=("S", "R")),
    # softcap + token_weight (a DTensor placed as the tokens): the mean over the whole mesh
    KC("mesh-cap-kl-w4-dp2-tp2-ce", 4, [7, 6], "distill", dict(CAP, ce_weight=0.3), labels=True,
       mesh=(2, 2), h_pl=("S", "C")),
    KC("mesh-cap-llp-w2-dp-only", 2, [13], "linear_logprobs", dict(CAP, return_entropy=True),
       mesh=(2,), h_pl=("S",), w_pl=("R",)),
]
CASES += MESH_CASES
# no vocabulary-parallel dim, tokens sharded over the mesh: one rank's invalid option or target must
# raise on every rank (the loss's mean over the mesh / the replicated head's gradient all-reduce
# would leave the others waiting)
CASES += [
    KC("err-mesh-kl-w2-dp-only-temperature", 2, [13], "distill", labels=True, mesh=(2,), h_pl=("S",),
       rank_opts={1: dict(temperature=-1.0)}, error=True),
    KC("err-mesh-lkl-w2-dp-only-divergence", 2, [13], "linear_distill", labels=True, mesh=(2,), h_pl=("S",),
       w_pl=("R",), rank_opts={0: dict(divergence="jensen")}, error=True),
    KC("err-mesh-llp-w2-dp-only-temperature", 2, [13], "linear_logprobs", mesh=(2,), h_pl=("S",),
       w_pl=("R",), rank_opts={1: dict(temperature=0.0)}, error=True),
    # DTensor operands: a vocab_start_index on one rank is refused on every rank, not ignored
    KC("err-dt-lp-vocab-start", 2, [7, 6], rank_opts={1: dict(vocab_start_index=7)}, dtensor=True,
       error=True),
    KC("err-dt-lkl-vocab-start", 2, [7, 6], "linear_distill", labels=True,
       rank_opts={0: dict(vocab_start_index=0)}, dtensor=True, error=True),
]
OK_CASES = [c for c in CASES if not c.error and not c.mesh]
