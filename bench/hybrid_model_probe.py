"""Can megatron-core 0.19's HybridModel build this project's DeepSeek-V3 model? (docs/hybrid-model.md)

    python bench/hybrid_model_probe.py HF_DIR        # a bf16 checkpoint, e.g. one from converters/make_tiny_checkpoint.py

Builds HybridModel on CPU from the project's own local layer specs, split into hybrid layers
("+" MLA, "-" dense MLP, "E" MoE: DeepSeek layer i = hybrid layers 2i and 2i+1), once without and
once with the final norm + output layer; then loads the project's GPTModel from the checkpoint,
copies its weights across by name and compares the hidden states of one forward. One process, EP 1.
"""
import copy, sys, traceback, warnings
warnings.filterwarnings("ignore")
import torch
from megatron_easyep.checkpoint.reader import HFCheckpoint
from megatron_easyep.mcore import compat, model as M, parallel

ckpt = HFCheckpoint(sys.argv[1]); cfg = ckpt.config
parallel.init_parallel(expert_parallel=1)
tcfg = M.transformer_config(cfg)
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.identity_op import IdentityOp, IdentityFuncOp
from megatron.core.process_groups_config import ProcessGroupCollection
compat.apply_runtime_patches(tcfg)
block = compat.gpt.local_block_spec(tcfg, fused_experts=False)  # the local spec, MLA adapted
dense, moe = block.layer_specs[0], block.layer_specs[-1]
def only_attention(spec):
    s = copy.deepcopy(spec); sub = s.submodules
    sub.pre_mlp_layernorm = IdentityOp; sub.mlp = IdentityOp; sub.mlp_bda = IdentityFuncOp; return s
def only_mlp(spec):
    s = copy.deepcopy(spec); sub = s.submodules
    sub.input_layernorm = IdentityOp; sub.self_attention = IdentityOp; sub.self_attn_bda = IdentityFuncOp; return s
stack = ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
    mla_layer=only_attention(dense), mlp_layer=only_mlp(dense), moe_layer=only_mlp(moe)))
k = cfg.first_k_dense_replace
pattern = "+-" * k + "+E" * (cfg.num_hidden_layers - k)
print("pattern", pattern)
hcfg = copy.deepcopy(tcfg); hcfg.num_layers = len(pattern)
for post in (False, True):
    try:
        m = HybridModel(config=hcfg, hybrid_stack_spec=stack, vocab_size=cfg.vocab_size,
                        max_sequence_length=cfg.max_position_embeddings, hybrid_layer_pattern=pattern,
                        pre_process=True, post_process=post, position_embedding_type="rope",
                        rotary_base=int(cfg.rope_theta), pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        names = [n for n, _ in m.named_parameters()]
        print(f"post_process={post}: built, {len(names)} parameters; e.g.", [n for n in names if ".1." in n or "layers.3." in n][:8])
        ids = torch.arange(8).unsqueeze(0)
        out = m(ids, position_ids=ids, attention_mask=None)
        print("  forward ok", tuple(out.shape))
    except Exception as e:
        print(f"post_process={post}: FAILED: {type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=-3)

# Same weights as the project's GPTModel (loaded from the checkpoint), translated by name:
# DeepSeek layer i = hybrid layers 2i (input_layernorm, self_attention.*) and 2i+1 (pre_mlp_layernorm, mlp.*)
import re
_, gpt = M.load_megatron_model(sys.argv[1], logits=False)
hyb = HybridModel(config=hcfg, hybrid_stack_spec=stack, vocab_size=cfg.vocab_size,
                  max_sequence_length=cfg.max_position_embeddings, hybrid_layer_pattern=pattern,
                  pre_process=True, post_process=False, position_embedding_type="rope",
                  rotary_base=int(cfg.rope_theta), pg_collection=ProcessGroupCollection.use_mpu_process_groups()).eval()
def hybrid_name(name):
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    i, rest = int(m.group(1)), m.group(2)
    sub = 2 * i if rest.startswith(("input_layernorm", "self_attention")) else 2 * i + 1
    return f"decoder.layers.{sub}.{rest}"
gsd = gpt.state_dict(); hsd = hyb.state_dict()
tensors = {k: v for k, v in gsd.items() if v is not None and torch.is_tensor(v)}
mapped = {hybrid_name(k): v for k, v in tensors.items()}
missing = sorted(k for k in hsd if k not in mapped and torch.is_tensor(hsd[k]) and not k.endswith("_extra_state"))
print("hybrid tensors without a GPT source:", missing[:5], len(missing))
hyb.load_state_dict({k: v for k, v in mapped.items() if k in hsd}, strict=False)
torch.manual_seed(0)
ids = torch.randint(0, cfg.vocab_size, (1, 32))
with torch.no_grad():
    a = gpt(ids, position_ids=torch.arange(32).unsqueeze(0), attention_mask=None)
    b = hyb(ids, position_ids=torch.arange(32).unsqueeze(0), attention_mask=None)
print("GPTModel vs HybridModel hidden states: max |diff|", (a - b).abs().max().item(), "scale", a.abs().max().item())
