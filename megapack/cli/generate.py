"""`megapack generate --checkpoint DIR [--prompt TEXT | --messages FILE.json]`: answer with a trained model."""
from __future__ import annotations

import argparse
import json
import sys

from megapack.errors import MegapackError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `megapack generate`."""
    parser.add_argument("--checkpoint", required=True,
                        help="a run's checkpoints/ folder (its `latest`), one iter_XXXXXXX folder, a `megapack convert "
                             "hf-to-megatron` output, or a Hugging Face folder (config.json + safetensors)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prompt", default=None, help="one user message to answer")
    what.add_argument("--messages", default=None,
                      help="a JSON file of OpenAI-style messages [{\"role\", \"content\"}, ...] ending on a user turn")
    parser.add_argument("--system", default=None, help="system prompt when the messages have none")
    from megapack.data.render.templates import TEMPLATES

    parser.add_argument("--template", default=None, choices=[*TEMPLATES, "hf"],
                        help="a built-in template, or hf (the model folder's own chat_template); default: "
                             "the template the run trained with (its checkpoint or shards record it), else llama3")
    parser.add_argument("--template-date", default=None, help="with --template hf: the date strftime_now returns")
    parser.add_argument("--tokenizer-model", default=None,
                        help="tokenizer file or model folder (default: the checkpoint's tokenizer/ folder, the HF "
                             "folder, or the model folder the run trained)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="with --temperature: the sampling seed")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="compute precision (auto: fp32 on the CPU, the checkpoint's precision on a GPU)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole sequence for every token instead of using the KV cache (slow; a "
                             "reference)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per answer: {\"tokens\": [new ids], \"text\": answer}")


def run(args: argparse.Namespace) -> int:
    """Load the model once, then answer the prompt, the messages, or (a terminal, neither given) each typed line."""
    from megapack.inference.chat import ChatModel, read_messages, to_conversation
    from megapack.model.generate import Sampling

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise MegapackError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    messages = read_messages(args.messages) if args.messages else None
    if messages is not None:
        to_conversation(messages, where=f"--messages {args.messages}")  # before the model loads
    interactive = args.prompt is None and messages is None
    if interactive and not sys.stdin.isatty():
        raise MegapackError("give --prompt TEXT or --messages FILE.json (the interactive mode needs a terminal)")
    model = ChatModel(args.checkpoint, template=args.template, tokenizer_model=args.tokenizer_model,
                      template_date=args.template_date, dtype=args.dtype, use_cache=not args.no_cache)
    try:
        print(f"loaded {model.describe()}", file=sys.stderr, flush=True)
        if not interactive:
            _answer(model, messages or [{"role": "user", "content": args.prompt}], args, sampling)
            return 0
        print("type a message and press Enter; an empty line or Ctrl-D ends", file=sys.stderr, flush=True)
        history: list[dict] = []
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            history.append({"role": "user", "content": line})
            reply = _answer(model, history, args, sampling)
            history.append({"role": "assistant", "content": reply.text})
    finally:
        model.close()
    return 0


def _answer(model, messages: list[dict], args: argparse.Namespace, sampling):
    reply = model.reply(messages, max_new_tokens=args.max_new_tokens, sampling=sampling, system=args.system)
    if args.json:
        print(json.dumps({"tokens": reply.tokens, "text": reply.text}, ensure_ascii=False), flush=True)
    else:
        print(reply.text, flush=True)
    g = reply.generation
    rate = f"{(len(g.tokens) - 1) / g.decode_s:.1f} tokens/s" if len(g.tokens) > 1 and g.decode_s > 0 else "-"
    print(f"[{len(g.tokens)} tokens ({g.stopped}); prompt {g.prompt_tokens} tokens in {g.prefill_s:.2f} s; "
          f"decode {rate}]", file=sys.stderr, flush=True)
    return reply
