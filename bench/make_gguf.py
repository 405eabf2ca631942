"""Write the decoder of a Mistral-format checkpoint (e.g. a `python -m pixlocal.synthetic`
Nemo-shaped one) as an F16 GGUF that llama.cpp runs as a "llama" model, for same-shape
comparisons (bench/busy.py). Speed only: the vocabulary is a stand-in of the right size, and
no image path is written. Then `llama-quantize OUT.gguf OUT-q4_0.gguf Q4_0`.

    python bench/make_gguf.py /work/big/nemo8 /work/big/nemo8-f16.gguf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
         "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
         "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
         "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(name: str) -> str | None:
    if name == "tok_embeddings.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    if name == "output.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[0] != "layers":
        return None  # the vision encoder and adapter
    return f"blk.{parts[1]}.{NAMES['.'.join(parts[2:-1])]}.weight"


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    p = json.loads((a.src / "params.json").read_text())
    vocab = p["vocab_size"]
    w = gguf.GGUFWriter(str(a.out), "llama")
    w.add_name(a.src.name)
    w.add_context_length(4096)
    w.add_embedding_length(p["dim"])
    w.add_block_count(p["n_layers"])
    w.add_feed_forward_length(p["hidden_dim"])
    w.add_head_count(p["n_heads"])
    w.add_head_count_kv(p["n_kv_heads"])
    w.add_key_length(p["head_dim"])
    w.add_value_length(p["head_dim"])
    w.add_rope_dimension_count(p["head_dim"])
    w.add_rope_freq_base(float(p.get("rope_theta", 1e9)))
    w.add_layer_norm_rms_eps(float(p.get("norm_eps", 1e-5)))
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    with safe_open(a.src / "consolidated.safetensors", "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            g = gguf_name(name)
            if g is None:
                continue
            t = f.get_tensor(name).float().numpy()
            w.add_tensor(g, t.astype(np.float32 if t.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(a.out)


if __name__ == "__main__":
    main()
