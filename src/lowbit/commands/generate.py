"""``lowbit generate [MODEL_OR_OUT] --prompt TEXT``: stream a continuation from the lean decoder.

Tokens go to stdout as they are produced; prefill and decode speed go to stderr at the end.
MODEL_OR_OUT is anything `lowbit.api.load` takes: a builtin name, an HF directory, a GGUF file or
a lowbit checkpoint (quantized layers then run through their registered kernels).
"""

from __future__ import annotations

import os
import sys

from lowbit.commands._args import add_activation_args, int8_activations
from lowbit.commands._args import log as _log
from lowbit.errors import LowbitError


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads for torch (and OpenMP code loaded later); None leaves the default."""
    if n is None:
        return
    if n < 1:
        raise LowbitError(f"--threads must be >= 1, got {n}")
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)  # read by native OpenMP kernels loaded after this
    torch.set_num_threads(n)


def load_for_inference(spec: str | None):
    """(api.Model, tokenizer) for MODEL_OR_OUT, with a one-line error when there is no tokenizer."""
    from lowbit import api

    m = api.load(spec)
    if m.tokenizer is None:
        raise LowbitError(f"{spec} has no tokenizer files; generation needs one")
    return m


def stop_ids(m) -> set[int]:
    """End-of-sequence ids of the tokenizer, config and generation config."""
    out: set[int] = set()
    for src in (m.tokenizer, getattr(m.model, "config", None), getattr(m.model, "generation_config", None)):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(int(x) for x in v if isinstance(x, int))
    return out


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if not text:
        raise LowbitError("--prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LowbitError("--chat: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(text).input_ids
    if not ids:
        raise LowbitError("the prompt encodes to no tokens")
    return list(ids)


def cmd_generate(args) -> int:
    from lowbit.runtime import LeanDecoder, SamplingParams, run_generation

    set_threads(args.threads)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    m = load_for_inference(args.model)
    ids = encode_prompt(m.tokenizer, args.prompt, args.chat)
    max_len = args.max_len or len(ids) + args.max_new_tokens
    limit = getattr(m.model.config, "max_position_embeddings", None)
    if limit and max_len > limit:
        raise LowbitError(f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens exceeds the model's "
                          f"maximum length {limit}")
    import torch

    dec = LeanDecoder(m.model, max_len=max_len, int8_activations=int8_activations(args, m),
                      kv_dtype=getattr(torch, args.kv_cache))
    stops = set() if args.ignore_eos else stop_ids(m)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        out, st = run_generation(dec, m.tokenizer, ids, args.max_new_tokens, sampling, stops, write)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")
        return 0
    import torch

    _log(f"{m.name}: prefill {st.prompt_tokens} tokens in {st.prefill_s * 1000:.0f} ms ({st.prefill_tok_s:.1f} tok/s), "
         f"decode {st.decode_tokens} tokens in {st.decode_s * 1000:.0f} ms ({st.decode_tok_s:.1f} tok/s), "
         f"{torch.get_num_threads()} threads" + (", stopped at end-of-sequence" if out and out[-1] in stops else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the lean decoder, streaming tokens to stdout")
    p.add_argument("model", nargs="?", help="model or lowbit checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default)")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: random)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--max-len", type=int, help="KV cache length (default: prompt + new tokens)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--kv-cache", choices=["float32", "float16"], default="float32",
                   help="KV cache element type (float16: half the memory, as llama.cpp's default)")
    add_activation_args(p)
    p.set_defaults(func=cmd_generate)
