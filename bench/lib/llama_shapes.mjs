// The Llama-shaped state dict of bench/lib/make_llama_checkpoint.py (same names and shapes), for JS benchmarks.
export function llamaShapes({ layers = 8, hidden = 2048, intermediate = 5632, vocab = 32000 } = {}) {
  const out = [['model.embed_tokens.weight', [vocab, hidden]]]
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`
    out.push(
      [p + 'self_attn.q_proj.weight', [hidden, hidden]],
      [p + 'self_attn.k_proj.weight', [hidden, hidden]],
      [p + 'self_attn.v_proj.weight', [hidden, hidden]],
      [p + 'self_attn.o_proj.weight', [hidden, hidden]],
      [p + 'mlp.gate_proj.weight', [intermediate, hidden]],
      [p + 'mlp.up_proj.weight', [intermediate, hidden]],
      [p + 'mlp.down_proj.weight', [hidden, intermediate]],
      [p + 'input_layernorm.weight', [hidden]],
      [p + 'post_attention_layernorm.weight', [hidden]],
    )
  }
  out.push(['model.norm.weight', [hidden]], ['lm_head.weight', [vocab, hidden]])
  return out
}
