"""Memory planning for scoring and serving, from a checkpoint's config.json alone.

Every number is computed from the config (no tensor is read): parameter counts per component
(embedding, lm_head, attention, dense MLP, shared experts, routed experts, router, norms, MTP),
their bytes in bf16 or in DeepSeek's FP8 layout (e4m3 + a float32 scale per 128x128 block), an
explicit per-rank activation/workspace estimate, and from those:

  (a) the PP x EP layouts that fit the FULL model for scoring with megatron-easyep (TP = 1, not
      supported; PP stages hold contiguous layer runs, EP groups live inside a stage): every rank
      holds its stage's non-expert weights whole and n_routed_experts / EP experts of each of its
      MoE layers; the first stage also holds the embedding; scoring builds no final norm, no
      lm_head and no logits. Weights are counted as the loader holds them (bf16, or FP8-resident
      for FP8 checkpoints), and the exact torchrun line is printed.
  (b) for each kept-expert count M, the smallest number of GPUs that serves the pruned model with
      FP8 weights (see ServeAssumptions for the serving layout assumed).

Shapes follow DeepSeek-V3's HF tensors (shared/reference/deepseek-checkpoint.md); the MTP layer
(num_nextn_predict_layers) is counted where it is stored (checkpoint and serving totals) and not
where megatron-easyep does not build it (scoring).
"""

from __future__ import annotations

import dataclasses
import math

from megatron_easyep.checkpoint.reader import DeepseekV3Config

GIB = 1024**3
DEFAULT_BLOCK = (128, 128)

TP_NOTE = "tensor parallelism is not supported"


# ------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Part:
    """A group of tensors: parameters and stored bytes (bf16 / FP8 checkpoint layout)."""

    scope: str      # "main" or "mtp"
    category: str   # embedding, lm_head, final_norm, norms, attention, dense_mlp,
    #                 shared_experts, routed_experts, router, mtp_extra
    params: int = 0
    quantized_params: int = 0  # stored as e4m3 in an FP8 checkpoint
    scale_elements: int = 0    # float32 scale_inv entries for those
    fp32_params: int = 0       # stored as float32 in every checkpoint (the router's expert bias)

    def bytes(self, dtype: str) -> int:
        """Stored bytes: "bf16" (all 2 bytes but the fp32 bias), "fp8" (DeepSeek's layout),
        "fp32" (everything 4 bytes, as the CPU scoring run holds it)."""
        if dtype == "fp32":
            return 4 * self.params
        other = self.params - self.fp32_params
        if dtype == "bf16":
            return 2 * other + 4 * self.fp32_params
        if dtype == "fp8":
            return (self.quantized_params + 4 * self.scale_elements
                    + 2 * (other - self.quantized_params) + 4 * self.fp32_params)
        raise ValueError(f"dtype {dtype!r}: choose bf16, fp8 or fp32")


class Counter:
    def __init__(self, block=DEFAULT_BLOCK):
        self.block = block
        self.parts: dict[tuple[str, str], Part] = {}

    def add(self, scope, category, shape, count=1, *, quantized=False, fp32=False):
        part = self.parts.setdefault((scope, category), Part(scope, category))
        numel = math.prod(shape) * count
        part.params += numel
        if quantized:
            rows, cols = shape
            part.quantized_params += numel
            part.scale_elements += math.ceil(rows / self.block[0]) * math.ceil(cols / self.block[1]) * count
        if fp32:
            part.fp32_params += numel


def _layer(counter: Counter, cfg: DeepseekV3Config, scope: str, moe: bool, experts: int, count: int):
    """`count` identical decoder layers (HF tensors)."""
    H, heads = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    add = counter.add
    add(scope, "norms", (H,), 2 * count)  # input_layernorm, post_attention_layernorm
    if cfg.q_lora_rank is None:
        add(scope, "attention", (heads * qk, H), count, quantized=True)               # q_proj
    else:
        add(scope, "attention", (cfg.q_lora_rank, H), count, quantized=True)          # q_a_proj
        add(scope, "attention", (cfg.q_lora_rank,), count)                            # q_a_layernorm
        add(scope, "attention", (heads * qk, cfg.q_lora_rank), count, quantized=True)  # q_b_proj
    add(scope, "attention", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), count, quantized=True)
    add(scope, "attention", (cfg.kv_lora_rank,), count)                               # kv_a_layernorm
    add(scope, "attention", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        count, quantized=True)                                                        # kv_b_proj
    add(scope, "attention", (H, heads * cfg.v_head_dim), count, quantized=True)       # o_proj
    if not moe:
        I = cfg.intermediate_size
        add(scope, "dense_mlp", (I, H), 2 * count, quantized=True)  # gate_proj, up_proj
        add(scope, "dense_mlp", (H, I), count, quantized=True)      # down_proj
        return
    F = cfg.moe_intermediate_size
    add(scope, "router", (experts, H), count)                     # gate.weight (bf16, never FP8)
    add(scope, "router", (experts,), count, fp32=True)            # e_score_correction_bias
    add(scope, "routed_experts", (F, H), 2 * experts * count, quantized=True)
    add(scope, "routed_experts", (H, F), experts * count, quantized=True)
    if cfg.n_shared_experts:
        S = F * cfg.n_shared_experts
        add(scope, "shared_experts", (S, H), 2 * count, quantized=True)
        add(scope, "shared_experts", (H, S), count, quantized=True)


def count_parts(cfg: DeepseekV3Config, experts: int | None = None, block=None) -> list[Part]:
    """Every tensor of the checkpoint (HF layout), grouped by (scope, category). `experts`
    replaces n_routed_experts (a pruned model); `block` the FP8 block (default: the config's, or
    128 x 128 for a bf16 checkpoint)."""
    E = cfg.n_routed_experts if experts is None else experts
    counter = Counter(tuple(block or cfg.weight_block_size or DEFAULT_BLOCK))
    V, H = cfg.vocab_size, cfg.hidden_size
    counter.add("main", "embedding", (V, H))
    dense = sum(1 for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i))
    _layer(counter, cfg, "main", False, E, dense)
    _layer(counter, cfg, "main", True, E, cfg.num_hidden_layers - dense)
    counter.add("main", "final_norm", (H,))
    if not cfg.tie_word_embeddings:
        counter.add("main", "lm_head", (V, H))
    n_mtp = cfg.num_nextn_predict_layers
    if n_mtp:
        _layer(counter, cfg, "mtp", True, E, n_mtp)
        counter.add("mtp", "mtp_extra", (H,), 3 * n_mtp)       # enorm, hnorm, shared_head.norm
        counter.add("mtp", "mtp_extra", (H, 2 * H), n_mtp)     # eh_proj (bf16)
        counter.add("mtp", "mtp_extra", (V, H), 2 * n_mtp)     # embed_tokens, shared_head.head copies
    return list(counter.parts.values())


@dataclasses.dataclass
class ModelSize:
    parts: list[Part]
    cfg: DeepseekV3Config
    experts: int

    def select(self, scope=None, categories=None, exclude=()):
        return [p for p in self.parts if (scope is None or p.scope == scope)
                and (categories is None or p.category in categories) and p.category not in exclude]

    def params(self, **kw) -> int:
        return sum(p.params for p in self.select(**kw))

    def bytes(self, dtype: str, **kw) -> int:
        return sum(p.bytes(dtype) for p in self.select(**kw))

    @property
    def total_params(self) -> int:
        """Main model (what "671B" counts for DeepSeek-V3); MTP is `mtp_params`."""
        return self.params(scope="main")

    @property
    def mtp_params(self) -> int:
        return self.params(scope="mtp")

    @property
    def activated_params(self) -> int:
        """Parameters one token's forward multiplies through in the main model: everything but
        the embedding table (a row lookup) and the routed experts, plus num_experts_per_tok routed
        experts per MoE layer. DeepSeek-V3: 36.6 B ("37B activated"); 37.6 B if the embedding
        table is counted too (`embedding_params`)."""
        routed = self.params(scope="main", categories={"routed_experts"})
        per_token = routed * self.cfg.num_experts_per_tok // self.experts
        return self.total_params - self.embedding_params - routed + per_token

    @property
    def embedding_params(self) -> int:
        return self.params(scope="main", categories={"embedding"})


def model_size(cfg: DeepseekV3Config, experts: int | None = None, block=None) -> ModelSize:
    E = cfg.n_routed_experts if experts is None else experts
    return ModelSize(count_parts(cfg, E, block), cfg, E)


# ------------------------------------------------------------------------------------------------
# Activations and workspace (per rank, scoring one micro-batch)
# ------------------------------------------------------------------------------------------------

def scorer_bytes(*, tokens: int, hidden: int, top_k: int, expert_parallel: int, local_experts: int,
                 rows: int, dtype_bytes: int = 2) -> int:
    """Peak transient memory of ExpertScorer.observe for one MoE layer (scoring/scorer.py), as its
    code allocates it; tests/test_plan.py measures the real peak against this. Two phases:
    s_t: h~ = h + routed ([T, H], model dtype), then fp32 copies of h and h~ and one fp32 product
        inside cosine_similarity (3 x [T, H] fp32);
    sums: the int32 [T, 2 + k] per-token record and its EP all-gather (twice: parts + cat), the
        top-k ids, the [local experts, EP x T] routed mask, and per routed row (on this rank) the
        gate / norms in fp32, the bin index and pair indices in int64, five float64 metric terms
        and their stacked copy."""
    group = expert_parallel * tokens
    s_phase = tokens * hidden * (dtype_bytes + 3 * 4)
    sums_phase = (tokens * (2 + top_k) * 4 + 2 * group * (2 + top_k) * 4 + tokens * top_k * 2 * 8
                  + 2 * group * top_k * 8 + local_experts * group
                  + rows * (3 * 4 + 3 * 8 + 2 * 5 * 8))
    return max(s_phase, sums_phase)


def scoring_activation_bytes(cfg: DeepseekV3Config, *, tokens: int, expert_parallel: int,
                             dtype_bytes: int = 2, experts: int | None = None,
                             imbalance: float = 2.0, fp8_resident: bool = False) -> dict[str, int]:
    """Peak transient memory of one scoring forward on one rank (one micro-batch of `tokens`
    tokens, no gradients), itemised. Scoring builds no output layer, so there are no logits.
    Assumes a fused attention kernel (no tokens x tokens score matrix); `imbalance` is how many
    times its fair share of routed rows (tokens x top-k) the busiest rank's experts receive."""
    E = cfg.n_routed_experts if experts is None else experts
    H, heads, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts_per_tok
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    F, I = cfg.moe_intermediate_size, cfg.intermediate_size
    rows = imbalance * tokens * k
    out = {
        # q, k (nope+rope), v, kv_up output and the attention output for one layer
        "attention": tokens * heads * (3 * qk + 3 * cfg.v_head_dim) * dtype_bytes,
        # routed rows: permuted input, all-to-all buffers, expert output, un-permute (4 x [rows, H])
        # and the expert's fc1 output + activation (2 x [rows, 2F])
        "moe_dispatch": int(rows * (4 * H + 4 * F) * dtype_bytes),
        "dense_mlp": tokens * 3 * I * dtype_bytes,
        # residual stream, norms, MoE output: ~8 [tokens, H]
        "hidden_states": 8 * tokens * H * dtype_bytes,
        "scorer": scorer_bytes(tokens=tokens, hidden=H, top_k=k, expert_parallel=expert_parallel,
                               local_experts=E // expert_parallel, rows=int(rows / expert_parallel),
                               dtype_bytes=dtype_bytes),
    }
    if fp8_resident:
        # FP8-resident linears dequantise one weight at a time for the GEMM: the largest one
        out["fp8_dequant"] = max(I, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)) * H * dtype_bytes
    return out


def logits_bytes(cfg: DeepseekV3Config, tokens: int, dtype_bytes: int = 2) -> int:
    """What an output layer would add (and scoring does not build): logits [tokens, vocab] plus
    one same-size temporary."""
    return 2 * tokens * cfg.vocab_size * dtype_bytes


# ------------------------------------------------------------------------------------------------
# (a) scoring layouts: PP x EP (TP = 1)
# ------------------------------------------------------------------------------------------------

WEIGHTS = {
    "bf16": "bf16 (a bf16 checkpoint, or an FP8 one with --dequantize-at-load)",
    "fp8": "FP8-resident (DeepSeek FP8 linears at 1 byte + fp32 128x128 block scales, the rest as "
           "stored; the loader's default for FP8 checkpoints)",
    "fp32": "fp32 (the CPU default)",
}


def layer_bytes(cfg: DeepseekV3Config, dtype: str, expert_parallel: int) -> list[int]:
    """Bytes one rank holds for each decoder layer: the layer's non-expert weights whole and
    n_routed_experts / EP of its routed experts (`dtype` as in Part.bytes)."""
    out = []
    for moe in (False, True):
        counter = Counter(tuple(cfg.weight_block_size or DEFAULT_BLOCK))
        _layer(counter, cfg, "main", moe, cfg.n_routed_experts, 1)
        parts = counter.parts.values()
        experts = sum(p.bytes(dtype) for p in parts if p.category == "routed_experts")
        rest = sum(p.bytes(dtype) for p in parts if p.category != "routed_experts")
        out.append(int(rest + experts / expert_parallel))
    dense, moe = out
    return [moe if cfg.is_moe_layer(i) else dense for i in range(cfg.num_hidden_layers)]


@dataclasses.dataclass
class ScoringLayout:
    ep: int
    pp: int
    gpus: int
    nodes: int
    gpus_per_node: int
    weights_bytes: int          # the largest stage's weights per rank
    activation_bytes: int
    overhead_bytes: int
    supported: bool = True
    stage_layers: tuple[int, ...] = (1,)
    stage_weight_bytes: tuple[int, ...] = ()  # per stage, per rank
    ep_within_node: bool = True

    @property
    def per_rank_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.overhead_bytes

    def torchrun(self, *, checkpoint: str = "CKPT", tokens: int | None = None,
                 dequantize_at_load: bool = False, demos: list[str] | None = None,
                 output: str | None = None) -> str:
        """The launch line (run on every node; NODE_RANK and MASTER_ADDR from the scheduler)."""
        cmd = ["torchrun", f"--nnodes {self.nodes}", f"--nproc-per-node {self.gpus_per_node}"]
        if self.nodes > 1:
            cmd += ["--node-rank $NODE_RANK", "--master-addr $MASTER_ADDR", "--master-port 29500"]
        cmd += ["launch/score.py", f"--hf-checkpoint {checkpoint}", f"--expert-parallel {self.ep}"]
        if self.pp > 1:
            cmd += [f"--pipeline-parallel {self.pp}", f"--pipeline-layout {','.join(map(str, self.stage_layers))}"]
        if tokens is not None:
            cmd += [f"--max-length {tokens}"]
        if dequantize_at_load:
            cmd += ["--dequantize-at-load"]
        cmd += [f"--demos {d}" for d in demos or []]
        if output is not None:
            cmd += [f"--output {output}"]
        return " ".join(cmd)


def _node_shape(gpus: int, gpus_per_node: int) -> tuple[int, int] | None:
    """(nodes, gpus used per node) for `gpus` ranks with the same count on every node."""
    if gpus <= gpus_per_node:
        return 1, gpus
    if gpus % gpus_per_node == 0:
        return gpus // gpus_per_node, gpus_per_node
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def stage_weights(cfg: DeepseekV3Config, dtype: str, ep: int, counts: list[int]) -> list[int]:
    """Weights per rank of every pipeline stage for scoring: its layers, the embedding on the
    first stage; no final norm, no lm_head (scoring builds no output layer), no MTP layer."""
    per_layer = layer_bytes(cfg, dtype, ep)
    embedding = model_size(cfg).bytes(dtype, scope="main", categories={"embedding"})
    out, start = [], 0
    for stage, n in enumerate(counts):
        out.append(sum(per_layer[start:start + n]) + (embedding if stage == 0 else 0))
        start += n
    return out


def scoring_layouts(cfg: DeepseekV3Config, *, gpus_per_node: int, gpu_memory_bytes: int,
                    dtype: str = "bf16", tokens: int = 4096, overhead_bytes: int = 3 * GIB,
                    max_pp: int = 16, imbalance: float = 2.0) -> list[ScoringLayout]:
    """Every EP (divisor of n_routed_experts) x PP (1 .. max_pp) layout with DP = 1 that fits the
    main model for scoring, best first: fewest GPUs, then EP inside a node (the all-to-all stays
    on NVLink; a stage is a node when EP = GPUs per node), then the fewest stages (a smaller
    pipeline bubble, fewer hops), then the least memory per rank.
    Stages split the decoder layers as `--pipeline-parallel` does by default
    (pipeline.stage_layer_counts); the largest stage sets the memory."""
    from megatron_easyep.mcore.pipeline import stage_layer_counts

    dtype_bytes = {"bf16": 2, "fp8": 2, "fp32": 4}[dtype]  # FP8 GEMMs still take bf16 activations
    layouts = []
    for pp in range(1, min(max(1, max_pp), cfg.num_hidden_layers) + 1):
        counts = stage_layer_counts(cfg.num_hidden_layers, pp)
        for ep in _divisors(cfg.n_routed_experts):
            shape = _node_shape(ep * pp, gpus_per_node)
            if shape is None:
                continue
            within = ep <= gpus_per_node and gpus_per_node % ep == 0
            if pp > 1 and not within and ep % gpus_per_node:
                continue  # a stage would straddle nodes unevenly
            stages = stage_weights(cfg, dtype, ep, counts)
            activations = sum(scoring_activation_bytes(
                cfg, tokens=tokens, expert_parallel=ep, dtype_bytes=dtype_bytes, imbalance=imbalance,
                fp8_resident=dtype == "fp8").values())
            layout = ScoringLayout(ep, pp, ep * pp, shape[0], shape[1], max(stages), activations,
                                   overhead_bytes, True, tuple(counts), tuple(stages), within)
            if layout.per_rank_bytes <= gpu_memory_bytes:
                layouts.append(layout)
    layouts.sort(key=lambda l: (l.gpus, not l.ep_within_node, l.pp, l.per_rank_bytes))
    return layouts


# ------------------------------------------------------------------------------------------------
# (b) serving the pruned model
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServeAssumptions:
    """The serving layout assumed (vLLM / SGLang style): routed experts expert-parallel over all N
    GPUs (M % N == 0); everything else tensor-parallel within a node (TP = GPUs used per node, which
    must divide num_attention_heads) and replicated on every node; FP8 weights as the checkpoint
    stores them (MTP layer included when the config has one); an MLA KV cache of `kv_tokens`
    tokens per GPU (replicated across TP ranks, as vLLM does for MLA); `memory_utilization` of
    each GPU usable (vLLM's gpu_memory_utilization default) minus `overhead_bytes`."""

    kv_tokens: int = 65536
    kv_bytes_per_value: int = 2  # bf16 KV cache
    memory_utilization: float = 0.90
    overhead_bytes: int = 2 * GIB


@dataclasses.dataclass
class ServeLayout:
    kept: int
    gpus: int
    nodes: int
    tp: int
    ep: int
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_weight_bytes: int

    @property
    def per_gpu_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes


def kv_bytes_per_token(cfg: DeepseekV3Config, bytes_per_value: int = 2) -> int:
    """MLA caches the compressed latent and the rope key: (kv_lora_rank + qk_rope_head_dim) per
    layer per token."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value


def smallest_serving_layout(cfg: DeepseekV3Config, kept: int, *, gpus_per_node: int,
                            gpu_memory_bytes: int, assumptions: ServeAssumptions = ServeAssumptions(),
                            max_nodes: int = 64) -> ServeLayout | None:
    size = model_size(cfg, kept)
    experts = size.bytes("fp8", categories={"routed_experts"})
    rest = size.bytes("fp8") - experts
    kv = kv_bytes_per_token(cfg, assumptions.kv_bytes_per_value) * assumptions.kv_tokens
    usable = assumptions.memory_utilization * gpu_memory_bytes
    heads = cfg.num_attention_heads
    candidates = [(1, tp) for tp in range(1, gpus_per_node + 1)]
    candidates += [(nodes, gpus_per_node) for nodes in range(2, max_nodes + 1)]
    for nodes, tp in candidates:  # increasing GPU count
        gpus = nodes * tp
        if heads % tp or kept % gpus:
            continue
        layout = ServeLayout(kept, gpus, nodes, tp, gpus, int(rest / tp + experts / gpus), kv,
                             assumptions.overhead_bytes, size.bytes("fp8"))
        if layout.per_gpu_bytes <= usable:
            return layout
    return None


def default_keeps(n_experts: int) -> list[int]:
    """E, 3/4 E, 1/2 E, 3/8 E, 1/4 E, 1/8 E (256 -> 256, 192, 128, 96, 64, 32), whole numbers only."""
    out = []
    for num, den in ((1, 1), (3, 4), (1, 2), (3, 8), (1, 4), (1, 8)):
        if (n_experts * num) % den == 0 and n_experts * num // den > 0:
            out.append(n_experts * num // den)
    return list(dict.fromkeys(out))


def routing_problems(cfg: DeepseekV3Config, kept: int) -> list[str]:
    """Why a pruned expert count breaks group-limited routing (empty when it does not)."""
    problems = []
    if kept > cfg.n_routed_experts or kept < 1:
        return [f"M={kept} is not between 1 and n_routed_experts={cfg.n_routed_experts}"]
    if kept < cfg.num_experts_per_tok:
        problems.append(f"M={kept} < num_experts_per_tok={cfg.num_experts_per_tok}")
    if cfg.n_group > 1:
        if kept % cfg.n_group:
            problems.append(f"M={kept} is not divisible by n_group={cfg.n_group}")
        elif kept // cfg.n_group < 2:
            problems.append(f"M/n_group={kept // cfg.n_group} < 2 experts per group")
        elif cfg.num_experts_per_tok > cfg.topk_group * (kept // cfg.n_group):
            problems.append(f"num_experts_per_tok={cfg.num_experts_per_tok} > topk_group x M/n_group")
    return problems


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

CATEGORY_ORDER = ("embedding", "attention", "norms", "dense_mlp", "shared_experts", "router",
                  "routed_experts", "final_norm", "lm_head", "mtp_extra")


def _gib(n) -> str:
    if n >= GIB / 10 or n == 0:
        return f"{n / GIB:,.1f} GiB"
    return f"{n / 2**20:,.2f} MiB"


def stages_text(counts) -> str:
    """16+15x3 for [16, 15, 15, 15]."""
    runs = []
    for n in counts:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return "+".join(f"{n}x{k}" if k > 1 else str(n) for n, k in runs)


def _b(n) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e8 else f"{n:,}"


def default_dtype(cfg: DeepseekV3Config) -> str:
    """How the loader holds the weights by default: FP8-resident for FP8 checkpoints, else bf16."""
    return "fp8" if cfg.is_fp8 else "bf16"


def build_report(cfg: DeepseekV3Config, *, gpus_per_node: int, gpu_memory_gib: float,
                 keeps: list[int] | None = None, dtype: str | None = None, tokens: int = 4096,
                 overhead_gib: float = 3.0, serve: ServeAssumptions = ServeAssumptions(),
                 imbalance: float = 2.0, max_pp: int = 16, checkpoint: str = "CKPT",
                 demos: list[str] | None = None, output: str | None = None,
                 world_size: int | None = None) -> dict:
    """Everything the plan command prints, as data. `dtype` None: as the loader holds them.
    `demos` / `output` complete the printed launch line (placeholders when not given).
    `world_size` (an allocation's ranks): also the best layout whose GPUs divide it (the rest of
    the ranks are data-parallel replicas), which the SLURM launcher uses."""
    dtype = dtype or default_dtype(cfg)
    memory = int(gpu_memory_gib * GIB)
    size = model_size(cfg)
    parts = {f"{p.scope}/{p.category}": {"params": p.params, "bf16_bytes": p.bytes("bf16"),
                                         "fp8_bytes": p.bytes("fp8")} for p in size.parts}
    layouts = scoring_layouts(cfg, gpus_per_node=gpus_per_node, gpu_memory_bytes=memory,
                              dtype=dtype, tokens=tokens, overhead_bytes=int(overhead_gib * GIB),
                              imbalance=imbalance, max_pp=max_pp)
    keeps = keeps or default_keeps(cfg.n_routed_experts)
    serving = []
    for kept in keeps:
        layout = smallest_serving_layout(cfg, kept, gpus_per_node=gpus_per_node,
                                         gpu_memory_bytes=memory, assumptions=serve)
        pruned = model_size(cfg, kept)
        serving.append({"kept": kept, "layout": layout, "params": pruned.total_params + pruned.mtp_params,
                        "activated": pruned.activated_params, "fp8_bytes": pruned.bytes("fp8"),
                        "routing_problems": routing_problems(cfg, kept)})
    dtype_bytes = 4 if dtype == "fp32" else 2
    return {"cfg": cfg, "size": size, "parts": parts, "dtype": dtype, "tokens": tokens,
            "gpus_per_node": gpus_per_node, "gpu_memory_gib": gpu_memory_gib,
            "overhead_gib": overhead_gib, "imbalance": imbalance, "scoring": layouts,
            "checkpoint": checkpoint,
            "demos": list(demos) if demos else ["DEMOS.jsonl:DOMAIN"], "output": output or "SCORES_DIR",
            "dequantize_at_load": cfg.is_fp8 and dtype == "bf16",
            "activations": scoring_activation_bytes(
                cfg, tokens=tokens, expert_parallel=layouts[0].ep if layouts else 1,
                dtype_bytes=dtype_bytes, imbalance=imbalance, fp8_resident=dtype == "fp8"),
            "logits_bytes": logits_bytes(cfg, tokens, dtype_bytes),
            "lm_head_bytes": size.bytes(dtype, scope="main", categories={"lm_head"}),
            "serving": serving, "serve": serve, "world_size": world_size,
            "for_world": None if world_size is None else next(
                (l for l in layouts if world_size % l.gpus == 0), None)}


def format_report(report: dict) -> str:
    cfg, size = report["cfg"], report["size"]
    dtype = report["dtype"]
    lines = []
    w = lines.append
    w(f"Model: {cfg.source}")
    w(f"  {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense, "
      f"{len(cfg.moe_layer_ids)} MoE) + {cfg.num_nextn_predict_layers} MTP; "
      f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), "
      f"{cfg.n_shared_experts} shared; hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    w(f"  parameters: {_b(size.total_params)} main model, {_b(size.activated_params)} activated "
      f"per token; MTP {_b(size.mtp_params)}")
    w("")
    w(f"{'component':<28}{'params':>16}{'bf16':>14}{'fp8 (ckpt)':>14}")
    for scope in ("main", "mtp"):
        for cat in CATEGORY_ORDER:
            part = next((p for p in size.parts if p.scope == scope and p.category == cat), None)
            if part is None:
                continue
            w(f"{scope + '/' + cat:<28}{part.params:>16,}{_gib(part.bytes('bf16')):>14}"
              f"{_gib(part.bytes('fp8')):>14}")
    w(f"{'total (main + mtp)':<28}{size.params():>16,}{_gib(size.bytes('bf16')):>14}"
      f"{_gib(size.bytes('fp8')):>14}")
    w("")
    w(f"(a) Scoring the full model with megatron-easyep ({report['gpus_per_node']} x "
      f"{report['gpu_memory_gib']:g} GiB per node, {report['tokens']} tokens per micro-batch)")
    w(f"    weights: {WEIGHTS[dtype]}")
    w("    layouts are PP x EP with TP = 1 (" + TP_NOTE + "); EP groups stay inside a pipeline stage; "
      "ranks beyond PP x EP are data-parallel replicas (faster, same memory).")
    w("    A stage holds its decoder layers' non-expert weights whole plus n_routed_experts/EP experts "
      "per MoE layer; the first stage also the embedding. Scoring builds no final norm and no lm_head "
      f"(saves {_gib(report['lm_head_bytes'])} of weights on the last stage and "
      f"{_gib(report['logits_bytes'])} of logits at {report['tokens']} tokens); the MTP layer is not built.")
    act = report["activations"]
    w(f"    activation/workspace margin per rank (routing imbalance x{report['imbalance']:g}): "
      + ", ".join(f"{k} {_gib(v)}" for k, v in act.items())
      + f"; + {report['overhead_gib']:g} GiB fixed (CUDA context, NCCL, allocator)")
    w("    (assumes a fused attention kernel: on an H200 with torch 2.11, SDPA runs MLA's 192/128 "
      "head dims on cuDNN's fused kernel, flash-attention refuses them; the unfused math path would add "
      f"{_gib(report['tokens'] ** 2 * cfg.num_attention_heads * 4)} of attention scores)")
    if report["scoring"]:
        w(f"    {'PP':>3}{'EP':>5}{'GPUs':>6}{'nodes':>7}{'stage layers':>16}{'weights/rank':>15}"
          f"{'act+ws':>12}{'total/rank':>13}")
        for l in report["scoring"][:6]:
            w(f"    {l.pp:>3}{l.ep:>5}{l.gpus:>6}{l.nodes:>7}{stages_text(l.stage_layers):>16}"
              f"{_gib(l.weights_bytes):>15}{_gib(l.activation_bytes + l.overhead_bytes):>12}"
              f"{_gib(l.per_rank_bytes):>13}")
        best = report["scoring"][0]
        w(f"    -> smallest: PP={best.pp} x EP={best.ep} on {best.gpus} GPUs ({best.nodes} node(s) x "
          f"{best.gpus_per_node}); per-stage weights per rank: "
          + ", ".join(_gib(b) for b in best.stage_weight_bytes))
        w("       " + best.torchrun(checkpoint=report["checkpoint"], tokens=report["tokens"],
                                    dequantize_at_load=report["dequantize_at_load"],
                                    demos=report["demos"], output=report["output"]))
    else:
        w("    -> the full model does not fit on this node shape with any PP x EP "
          f"(EP a divisor of {cfg.n_routed_experts}).")
    if report["world_size"] is not None:
        fit = report["for_world"]
        w(f"    -> for {report['world_size']} ranks: " + (
            f"PP={fit.pp} x EP={fit.ep} ({fit.gpus} GPUs per replica, data parallel "
            f"{report['world_size'] // fit.gpus})" if fit else "no layout's GPU count divides it"))
    w("")
    serve = report["serve"]
    w(f"(b) Serving the pruned model with FP8 weights ({report['gpus_per_node']} x "
      f"{report['gpu_memory_gib']:g} GiB per node)")
    w(f"    assumed: experts EP over all N GPUs (M % N == 0), the rest TP within a node and "
      f"replicated across nodes; KV cache {serve.kv_tokens} tokens/GPU "
      f"({_gib(kv_bytes_per_token(cfg, serve.kv_bytes_per_value) * serve.kv_tokens)}); "
      f"{serve.memory_utilization:.0%} of GPU memory usable, {_gib(serve.overhead_bytes)} overhead")
    w(f"    {'M':>5}{'params':>12}{'activated':>12}{'fp8 size':>13}{'GPUs':>6}{'nodes':>7}"
      f"{'TP':>4}{'EP':>5}{'per GPU':>12}")
    for row in report["serving"]:
        l = row["layout"]
        head = (f"    {row['kept']:>5}{_b(row['params']):>12}{_b(row['activated']):>12}"
                f"{_gib(row['fp8_bytes']):>13}")
        if l is None:
            w(head + "   does not fit on up to 64 nodes of this shape")
        else:
            w(head + f"{l.gpus:>6}{l.nodes:>7}{l.tp:>4}{l.ep:>5}{_gib(l.per_gpu_bytes):>12}")
        for problem in row["routing_problems"]:
            w(f"          ! M={row['kept']}: {problem} (see the exporter's --group-policy)")
    return "\n".join(lines)


def report_as_json(report: dict) -> dict:
    def layout(l):
        return None if l is None else {k: v for k, v in dataclasses.asdict(l).items()}

    size = report["size"]
    return {
        "total_params": size.total_params, "activated_params": size.activated_params,
        "mtp_params": size.mtp_params, "parts": report["parts"],
        "weights": report["dtype"], "tokens": report["tokens"], "imbalance": report["imbalance"],
        "scoring": [dict(layout(l), per_rank_bytes=l.per_rank_bytes,
                         torchrun=l.torchrun(checkpoint=report["checkpoint"], tokens=report["tokens"],
                                             dequantize_at_load=report["dequantize_at_load"],
                                             demos=report["demos"], output=report["output"]))
                    for l in report["scoring"]],
        "recommended": None if not report["scoring"] else {
            k: getattr(report["scoring"][0], k) for k in ("pp", "ep", "gpus", "nodes", "gpus_per_node")}
        | {"stage_layers": list(report["scoring"][0].stage_layers)},
        # the best layout whose GPU count divides --world-size (null without one, or when none does)
        "for_world": None if report["for_world"] is None else {
            k: getattr(report["for_world"], k) for k in ("pp", "ep", "gpus", "nodes", "gpus_per_node")}
        | {"stage_layers": list(report["for_world"].stage_layers), "world_size": report["world_size"]},
        "activation_bytes": report["activations"],
        "lm_head_bytes_not_built": report["lm_head_bytes"], "logits_bytes_not_built": report["logits_bytes"],
        "serving": [{"kept": r["kept"], "params": r["params"], "activated": r["activated"],
                     "fp8_bytes": r["fp8_bytes"], "routing_problems": r["routing_problems"],
                     "layout": layout(r["layout"])} for r in report["serving"]],
    }
